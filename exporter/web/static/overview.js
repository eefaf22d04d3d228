// The overview page: a view of /api/v1/overview, refreshed every few seconds.
// Every value from the API is inserted as text (textContent), never as markup:
// task names, exception messages and tracebacks come from the network.
"use strict";

(function () {
  // From the origin, which never carries the user:password@ a page address may have:
  // fetch() refuses such URLs, and the browser sends the credentials it holds anyway.
  const API = new URL("/api/v1/overview", window.location.origin).href;
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

  function fillFailures(recent) {
    const list = byId("failures");
    const note = byId("failures-note");
    if (!recent.enabled) {
      note.textContent = "the list is turned off (--recent-failures 0)";
      list.replaceChildren();
      return;
    }
    note.textContent = `the last ${recent.capacity}, newest first; arguments and results are never kept`;
    const newest = recent.items[0];
    const signature = `${recent.items.length}:${newest ? newest.uuid + newest.time : ""}`;
    if (signature === failuresShown) return; // keeps open tracebacks open
    failuresShown = signature;
    list.replaceChildren();
    if (recent.items.length === 0) {
      list.append(element("li", "No failure since the exporter started.", "none"));
      return;
    }
    for (const failure of recent.items) {
      const item = element("li");
      item.dataset.uuid = failure.uuid;
      const line = element("div");
      line.append(
        element("span", clock(failure.time), "when"),
        element("span", failure.exception, "exception"),
        document.createTextNode(" "),
        element("span", failure.message, "message"),
      );
      const where = element("div", `${failure.name} · ${failure.uuid} · ${failure.hostname}`, "where");
      item.append(line, where);
      if (failure.traceback) {
        const details = element("details");
        details.append(element("summary", "traceback"), element("pre", failure.traceback));
        item.append(details);
      }
      list.append(item);
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
    fillFailures(data.recent_failures);
    byId("updated").textContent = `updated ${clock(now)}, every ${REFRESH_MS / 1000} s`;
  }

  async function refresh() {
    try {
      const response = await fetch(API, { cache: "no-store", credentials: "same-origin" });
      if (!response.ok) throw new Error(`/api/v1/overview answered ${response.status}`);
      render(await response.json());
    } catch (error) {
      showProblem(`The exporter does not answer (${error.message}); trying again.`);
    } finally {
      window.setTimeout(refresh, REFRESH_MS);
    }
  }

  refresh();
})();
