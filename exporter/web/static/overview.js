// The overview page: a view of /api/v1/overview, refreshed every few seconds.
// Every value from the API is inserted as text (textContent), never as markup:
// task names, exception messages and tracebacks come from the network.
"use strict";

(function () {
  // From the origin, which never carries the user:password@ a page address may have:
  // fetch() refuses such URLs, and the browser sends the credentials it holds anyway.
  const API = new URL("/api/v1/overview", window.location.origin).href;
  const TASKS = new URL("/api/v1/tasks", window.location.origin).href;
  const RECENT_LIMIT = 20;
  const LOOKUP_MATCHES = 10;
  const REFRESH_MS = 5000;
  const STATES = ["succeeded", "failed", "retried", "rejected", "revoked"];
  const SVG = "http://www.w3.org/2000/svg";
  const CHART = { width: 900, height: 220, left: 48, right: 12, top: 10, bottom: 24 };

  const byId = (id) => document.getElementById(id);

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function count(value) {
    return value === null || value === undefined ? null : Math.round(value).toLocaleString("en-US");
  }

  function duration(value) {
    if (value === null || value === undefined) return null;
    if (value < 1) return (value * 1000).toPrecision(3).replace(/\.?0+$/, "") + " ms";
    if (value < 60) return value.toFixed(value < 10 ? 2 : 1) + " s";
    if (value < 3600) return (value / 60).toFixed(1) + " min";
    return (value / 3600).toFixed(1) + " h";
  }

  function ago(value) {
    if (value === null || value === undefined) return null;
    return value < 60 ? `${Math.round(Math.max(0, value))} s ago` : duration(value) + " ago";
  }

  function percent(value) {
    return value === null || value === undefined ? "n/a" : (value * 100).toFixed(1) + " %";
  }

  function mebibytes(value) {
    return value === null || value === undefined ? null : (value / 1048576).toFixed(1) + " MiB";
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString("en-GB");
  }

  // A table body from rows; a column whose key reads null in every row is hidden
  // (the figure is not exported by this build), other nulls read "n/a".
  function fillTable(id, rows, columns, empty) {
    const table = byId(id);
    const heads = table.tHead.rows[0].cells;
    const shown = columns.map(
      (column) => !column.key || rows.some((row) => row[column.key] !== null)
    );
    columns.forEach((column, index) => heads[index].classList.toggle("hidden", !shown[index]));
    const body = table.tBodies[0];
    body.replaceChildren();
    if (rows.length === 0) {
      const row = body.insertRow();
      const cell = row.insertCell();
      cell.colSpan = columns.length;
      cell.className = "none";
      cell.textContent = empty;
      return;
    }
    for (const data of rows) {
      const row = body.insertRow();
      columns.forEach((column, index) => {
        const cell = row.insertCell();
        const value = column.show(data);
        cell.textContent = value === null || value === undefined ? "n/a" : String(value);
        if (column.className) cell.className = column.className(data) || "";
        if (!shown[index]) cell.classList.add("hidden");
      });
    }
  }

  function drawChart(throughput, now) {
    const chart = byId("chart");
    const { width, height, left, right, top, bottom } = CHART;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const start = now - throughput.window_seconds;
    let highest = 0;
    for (const state of STATES) highest = Math.max(highest, ...throughput[state]);
    const ceiling = niceCeiling(highest);
    const x = (time) => left + (Math.max(0, time - start) / throughput.window_seconds) * plotWidth;
    const y = (value) => top + plotHeight - (value / ceiling) * plotHeight;

    chart.replaceChildren();
    for (const step of [0, 0.5, 1]) {
      const value = ceiling * step;
      chart.append(svg("line", { class: "grid", x1: left, x2: width - right, y1: y(value), y2: y(value) }));
      chart.append(svg("text", { class: "axis", x: left - 6, y: y(value) + 4, "text-anchor": "end" },
        count(value)));
    }
    for (const minutes of [15, 10, 5, 0]) {
      const label = minutes ? `−${minutes} min` : "now";
      const anchor = minutes === 15 ? "start" : minutes === 0 ? "end" : "middle";
      chart.append(svg("text", { class: "axis", x: x(now - minutes * 60), y: height - 6,
        "text-anchor": anchor }, label));
    }
    if (throughput.time.length === 0) {
      chart.append(svg("text", { class: "empty", x: left + plotWidth / 2, y: top + plotHeight / 2,
        "text-anchor": "middle" }, "The first point comes 10 s after the exporter starts."));
      return;
    }
    for (const state of STATES) {
      const points = throughput.time.map((time, index) =>
        `${x(time).toFixed(1)},${y(throughput[state][index]).toFixed(1)}`);
      const line = svg("polyline", { class: `series state-${state}`, points: points.join(" ") });
      line.dataset.state = state;
      line.append(svg("title", {}, state));
      const [lastX, lastY] = points[points.length - 1].split(",");
      // The latest value as a dot: a first point shows before there is a line to draw.
      chart.append(line, svg("circle", { class: `dot state-${state}`, cx: lastX, cy: lastY, r: 3 }));
    }
  }

  function niceCeiling(value) {
    if (value <= 0) return 1;
    const power = 10 ** Math.floor(Math.log10(value));
    for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  function drawLegend(throughput) {
    const legend = byId("legend");
    legend.replaceChildren();
    for (const state of STATES) {
      const total = throughput[state].reduce((sum, value) => sum + value, 0);
      const item = element("li", null, `state-${state}`);
      item.append(element("span", `${state} ${count(total)}`));
      legend.append(item);
    }
    byId("failure-ratio").textContent = percent(throughput.failure_ratio);
    byId("totals").textContent = "failed / (succeeded + failed), the last 15 minutes";
  }

  function fillExporter(exporter, now) {
    const list = byId("exporter");
    list.replaceChildren();
    const items = [
      ["connection", exporter.connected ? "connected" : `disconnected ${exporter.last_error}`],
      ["events received", count(exporter.events_received)],
      ["last event", exporter.last_event_at === null ? "never" : ago(now - exporter.last_event_at)],
      ["events per second", exporter.events_per_second === null ? null
        : exporter.events_per_second.toFixed(1)],
      ["invalid events", count(exporter.events_invalid)],
      ["missed events", count(exporter.events_missed)],
      ["memory (resident)", mebibytes(exporter.memory_bytes)],
      ["up since", clock(exporter.started_at)],
    ];
    for (const [name, value] of items) {
      if (value === null && name === "missed events") continue; // not exported by this build
      list.append(element("dt", name), element("dd", value === null ? "n/a" : value));
    }
    const connection = byId("connection");
    connection.textContent = exporter.connected ? "connected" : "disconnected";
    connection.className = exporter.connected ? "connected" : "disconnected";
    byId("broker").textContent = exporter.broker;
    showProblem(exporter.diagnosis);
  }

  function showProblem(text) {
    const problem = byId("problem");
    problem.textContent = text;
    problem.hidden = !text;
  }

  let failuresShown = "";

  // Failures grouped by task name and exception class over the window, each with
  // its count and its latest failure (message, worker, traceback on demand).
  function fillFailures(groups) {
    const list = byId("failures");
    const note = byId("failures-note");
    if (!groups.enabled) {
      note.textContent = "the list is turned off (--recent-failures 0)";
      list.replaceChildren();
      return;
    }
    note.textContent = `grouped by task and exception, the last ${groups.window_seconds / 60} minutes `
      + `(of the last ${groups.capacity} failures); arguments and results are never kept`;
    const signature = groups.items.map((g) => `${g.count}:${g.latest.uuid}`).join(",");
    if (signature === failuresShown) return; // keeps open tracebacks open
    failuresShown = signature;
    list.replaceChildren();
    if (groups.items.length === 0) {
      list.append(element("li", "No failure in the last 15 minutes.", "none"));
      return;
    }
    for (const group of groups.items) {
      const latest = group.latest;
      const item = element("li");
      item.dataset.uuid = latest.uuid;
      const line = element("div");
      line.append(
        element("span", count(group.count), "count"),
        element("span", group.exception, "exception"),
        document.createTextNode(" "),
        element("span", latest.message, "message"),
      );
      const where = element("div", null, "where");
      where.append(
        document.createTextNode(`${group.name} · latest `),
        taskLink(latest.uuid),
        document.createTextNode(` · ${latest.hostname} · ${clock(latest.time)}`),
      );
      item.append(line, where);
      if (latest.traceback) {
        const details = element("details");
        details.append(element("summary", "latest traceback"), element("pre", latest.traceback));
        item.append(details);
      }
      list.append(item);
    }
  }

  // A task id that opens the task in the search box when clicked.
  function taskLink(uuid) {
    const link = element("a", uuid, "task-id");
    link.href = "#lookup";
    link.addEventListener("click", (event) => {
      event.preventDefault();
      byId("lookup-id").value = uuid;
      lookup(uuid);
    });
    return link;
  }

  // Line charts on a canvas: one series over the window, gaps where a value is null.
  function drawCanvas(id, times, values, now, windowSeconds, format) {
    const canvas = byId(id);
    const ratio = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || canvas.width;
    const cssHeight = Math.round((cssWidth * 160) / 440);
    if (canvas.width !== Math.round(cssWidth * ratio)) {
      canvas.width = Math.round(cssWidth * ratio);
      canvas.height = Math.round(cssHeight * ratio);
    }
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, cssWidth, cssHeight);
    const left = 56, right = 8, top = 8, bottom = 20;
    const plotWidth = cssWidth - left - right, plotHeight = cssHeight - top - bottom;
    const known = values.filter((value) => value !== null && value !== undefined);
    const ceiling = niceCeiling(Math.max(0, ...known));
    const start = now - windowSeconds;
    const x = (time) => left + (Math.max(0, time - start) / windowSeconds) * plotWidth;
    const y = (value) => top + plotHeight - (value / ceiling) * plotHeight;
    const style = getComputedStyle(canvas);
    context.font = "11px system-ui, sans-serif";
    context.fillStyle = style.getPropertyValue("--muted").trim();
    context.strokeStyle = style.getPropertyValue("--line").trim();
    context.lineWidth = 1;
    context.textAlign = "right";
    for (const step of [0, 0.5, 1]) {
      if (step === 0.5 && format(ceiling * step) === format(ceiling)) continue; // counts of 1
      const level = Math.round(y(ceiling * step)) + 0.5;
      context.beginPath();
      context.moveTo(left, level);
      context.lineTo(cssWidth - right, level);
      context.stroke();
      context.fillText(format(ceiling * step) || "0", left - 6, level + 4);
    }
    context.textAlign = "center";
    context.fillText("−15 min", left + 20, cssHeight - 4);
    context.fillText("now", cssWidth - right - 12, cssHeight - 4);
    canvas.dataset.points = String(known.length);
    canvas.dataset.latest = known.length ? String(known[known.length - 1]) : "";
    if (known.length === 0) {
      context.fillText(times.length ? "nothing in the window" : "the first point comes within 10 s",
        left + plotWidth / 2, top + plotHeight / 2);
      return;
    }
    context.strokeStyle = style.color;
    context.fillStyle = style.color;
    context.lineWidth = 2;
    context.beginPath();
    let drawing = false;
    times.forEach((time, index) => {
      const value = values[index];
      if (value === null || value === undefined) {
        drawing = false;
        return;
      }
      if (drawing) context.lineTo(x(time), y(value));
      else context.moveTo(x(time), y(value));
      drawing = true;
    });
    context.stroke();
    times.forEach((time, index) => { // each point as a dot: a lone point shows too
      const value = values[index];
      if (value === null || value === undefined) return;
      context.beginPath();
      context.arc(x(time), y(value), 2, 0, 2 * Math.PI);
      context.fill();
    });
  }

  function fillWindow(timings, now) {
    const list = byId("window-figures");
    list.replaceChildren();
    for (const [name, figures] of [["run time", timings.runtime], ["queue wait", timings.queue_wait]]) {
      list.append(
        element("dt", `${name} p50`), element("dd", duration(figures.p50) || "n/a"),
        element("dt", `${name} p95`), element("dd", duration(figures.p95) || "n/a"),
      );
    }
    list.append(element("dt", "tasks timed"), element("dd", count(timings.runtime.count)));
    const span = timings.window_seconds;
    drawCanvas("chart-runtime", timings.time, timings.runtime_p95, now, span, duration);
    drawCanvas("chart-queue-wait", timings.time, timings.queue_wait_p95, now, span, duration);
    drawCanvas("chart-backlog", timings.time, timings.backlog, now, span, count);
  }

  // The recent tasks, filtered by state and name, asked of /api/v1/tasks.
  let recentAsked = 0;
  let lookupsOff = false; // --recent-tasks 0: asked once, then left alone

  async function refreshRecent() {
    if (lookupsOff) return;
    const asked = ++recentAsked;
    const url = new URL(TASKS);
    url.searchParams.set("limit", String(RECENT_LIMIT));
    const state = byId("recent-state").value;
    if (state) url.searchParams.set("state", state);
    let name = byId("recent-name").value.trim();
    if (name && !/[*?[]/.test(name)) name = `*${name}*`;
    if (name) url.searchParams.set("name", name);
    const response = await fetch(url.href, { cache: "no-store", credentials: "same-origin" });
    const answer = await response.json();
    if (asked !== recentAsked) return; // a newer filter's answer wins
    const note = byId("recent-note");
    if (!response.ok) {
      lookupsOff = response.status === 404;
      note.textContent = answer.error;
      fillRecent([]);
      return;
    }
    note.textContent = `newest first, at most ${answer.limit} of the last `
      + `${count(answer.capacity)} finished and those in flight; click an id for its life`;
    fillRecent(answer.items);
  }

  function fillRecent(items) {
    fillTable("recent-tasks", items, [
      { show: (t) => t.name },
      { show: (t) => t.state, className: (t) => `state-${t.state}` },
      { show: (t) => t.uuid, className: () => "task-id" },
      { show: (t) => t.worker },
      { show: (t) => count(t.retries) },
      { show: (t) => duration(t.runtime) },
      { show: (t) => clock(lastEvent(t)) },
    ], "No task matches.");
    for (const cell of byId("recent-tasks").querySelectorAll("td.task-id")) {
      cell.replaceChildren(taskLink(cell.textContent));
    }
  }

  const STEPS = [["sent", "sent"], ["received", "received"], ["started", "started"],
    ["retried", "retried"], ["ended", null]];

  function lastEvent(task) {
    return Math.max(...STEPS.map(([key]) => task[key] || 0));
  }

  // A task's life: each event it had, in time, on a line and as a list.
  function showTask(task) {
    byId("lookup-matches").replaceChildren();
    byId("lookup-note").textContent = "";
    byId("lookup-result").hidden = false;
    byId("lookup-title").textContent = `${task.name} · ${task.uuid}`;
    const steps = STEPS.filter(([key]) => task[key] !== null && task[key] !== undefined)
      .map(([key, label]) => ({ label: label || task.state, time: task[key] }))
      .sort((a, b) => a.time - b.time);
    const first = steps.length ? steps[0].time : 0;
    const list = byId("timeline");
    list.replaceChildren();
    for (const step of steps) {
      const item = element("li", null, `step state-${step.label}`);
      item.dataset.step = step.label;
      item.append(element("span", step.label, "label"), element("span", clock(step.time), "when"),
        element("span", step.time === first ? "" : `+${duration(step.time - first)}`, "offset"));
      list.append(item);
    }
    drawTimeline(steps);
    const details = byId("lookup-details");
    details.replaceChildren();
    for (const [name, value] of [
      ["state", task.state], ["worker", task.worker || "n/a"], ["queue", task.queue],
      ["retries", count(task.retries)], ["run time", duration(task.runtime) || "n/a"],
      ["exception", task.exception ? `${task.exception} ${task.message}` : "none"],
    ]) {
      const cell = element("dd", value);
      cell.dataset.field = name;
      details.append(element("dt", name), cell);
    }
    const traceback = byId("lookup-traceback");
    traceback.hidden = !task.traceback;
    traceback.querySelector("pre").textContent = task.traceback || "";
  }

  const STEP_COLOURS = { failed: "--bad", succeeded: "--good", retried: "--warn" };

  function drawTimeline(steps) {
    const canvas = byId("timeline-chart");
    const context = canvas.getContext("2d");
    const { width, height } = canvas;
    context.clearRect(0, 0, width, height);
    if (steps.length === 0) return;
    const first = steps[0].time, span = Math.max(steps[steps.length - 1].time - first, 1e-3);
    const x = (time) => 40 + ((time - first) / span) * (width - 80);
    const style = getComputedStyle(canvas);
    context.strokeStyle = style.getPropertyValue("--line").trim();
    context.lineWidth = 2;
    context.beginPath();
    context.moveTo(40, 22);
    context.lineTo(width - 40, 22);
    context.stroke();
    context.font = "12px system-ui, sans-serif";
    context.textAlign = "center";
    steps.forEach((step, index) => {
      context.fillStyle = style.getPropertyValue(STEP_COLOURS[step.label] || "--ink").trim();
      context.beginPath();
      context.arc(x(step.time), 22, 5, 0, 2 * Math.PI);
      context.fill();
      context.fillText(step.label, x(step.time), index % 2 ? 52 : 44);
    });
    canvas.dataset.steps = String(steps.length);
  }

  // By prefix first (an exact id is its own prefix), so an unknown id is an empty
  // answer rather than a failed request; then the one task found, in full.
  async function lookup(text) {
    const wanted = text.trim();
    const note = byId("lookup-note");
    if (!wanted) return;
    byId("lookup-result").hidden = true;
    const url = new URL(TASKS);
    url.searchParams.set("id", wanted);
    url.searchParams.set("limit", String(LOOKUP_MATCHES));
    const response = await fetch(url.href, { cache: "no-store", credentials: "same-origin" });
    const answer = await response.json();
    const matches = byId("lookup-matches");
    matches.replaceChildren();
    if (!response.ok) {
      note.textContent = answer.error;
      return;
    }
    const found = answer.items.find((task) => task.uuid === wanted)
      || (answer.items.length === 1 ? answer.items[0] : null);
    if (found) {
      const exact = await fetch(`${TASKS}/${encodeURIComponent(found.uuid)}`,
        { cache: "no-store", credentials: "same-origin" });
      showTask(exact.ok ? await exact.json() : found);
    } else if (answer.items.length === 0) {
      note.textContent = "No task with this id among those in flight and the recently finished.";
    } else {
      note.textContent = `${answer.items.length === LOOKUP_MATCHES ? "At least " : ""}`
        + `${answer.items.length} tasks start so; pick one:`;
      for (const task of answer.items) {
        const item = element("li");
        item.append(taskLink(task.uuid), document.createTextNode(` ${task.name} · ${task.state}`));
        matches.append(item);
      }
    }
  }


  function render(data) {
    const now = data.time;
    fillExporter(data.exporter, now);
    drawChart(data.throughput, now);
    drawLegend(data.throughput);
    fillTable("tasks", data.tasks, [
      { show: (t) => t.name },
      { key: "running", show: (t) => count(t.running) },
      { key: "oldest_running_age_seconds", show: (t) => duration(t.oldest_running_age_seconds) },
      { show: (t) => count(t.started) },
      { show: (t) => count(t.succeeded) },
      { show: (t) => count(t.failed) },
      { show: (t) => count(t.retried) },
      { show: (t) => duration(t.runtime_p50) },
      { show: (t) => duration(t.runtime_p95) },
      { show: (t) => duration(t.queue_wait_p50) },
      { show: (t) => duration(t.queue_wait_p95) },
    ], "No task seen yet.");
    fillTable("queues", data.queues, [
      { show: (q) => q.name },
      { key: "length", show: (q) => count(q.length) },
      { key: "consumers", show: (q) => count(q.consumers) },
      { key: "workers", show: (q) => count(q.workers) },
    ], "No queue probed yet.");
    fillTable("workers", data.workers, [
      { show: (w) => w.hostname },
      { show: (w) => (w.up ? "up" : "down"), className: (w) => (w.up ? "up" : "down") },
      { key: "active", show: (w) => count(w.active) },
      { key: "pool_size", show: (w) => count(w.pool_size) },
      { key: "prefetched", show: (w) => count(w.prefetched) },
      { key: "prefetch_limit", show: (w) => count(w.prefetch_limit) },
      { key: "processed", show: (w) => count(w.processed) },
      { show: (w) => ago(w.heartbeat_age_seconds) },
      { show: (w) => w.version || "unknown" },
    ], "No worker seen yet.");
    fillFailures(data.failure_groups);
    fillWindow(data.timings, now);
    byId("updated").textContent = `updated ${clock(now)}, every ${REFRESH_MS / 1000} s`;
  }

  async function refresh() {
    try {
      const response = await fetch(API, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error(`/api/v1/overview answered ${response.status}`);
      render(await response.json());
      await refreshRecent();
    } catch (error) {
      showProblem(`The exporter does not answer (${error.message}); trying again.`);
    } finally {
      window.setTimeout(refresh, REFRESH_MS);
    }
  }

  byId("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    lookup(byId("lookup-id").value).catch((error) => {
      byId("lookup-note").textContent = `The exporter does not answer (${error.message}).`;
    });
  });
  byId("recent-form").addEventListener("submit", (event) => event.preventDefault());
  for (const id of ["recent-state", "recent-name"]) {
    byId(id).addEventListener("input", () => refreshRecent().catch(() => {}));
  }

  refresh();
})();
