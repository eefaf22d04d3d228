#!/usr/bin/env bash
# Copy the Prometheus rules and Grafana dashboards into the Helm chart, which
# can only package files that live inside its own directory.
#
#   config/prometheus/alerts.yaml -> helm/celery-events-exporter/files/alerts.yaml
#   grafana/dashboards/*.json     -> helm/celery-events-exporter/files/dashboards/
#
# Run by `make chart-files`; tests/test_helm.py fails when the copies drift.
# Dashboards deleted from grafana/dashboards/ are deleted from the chart too.
# A missing source is reported and skipped (its chart copy is removed), so the
# script can run before the rules or dashboards exist.
#
# REPO_ROOT and CHART_DIR may be overridden (the tests do, to work in a copy).
set -euo pipefail

REPO_ROOT="${REPO_ROOT:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)}"
CHART_DIR="${CHART_DIR:-${REPO_ROOT}/helm/celery-events-exporter}"

rules_src="${REPO_ROOT}/config/prometheus/alerts.yaml"
rules_dst="${CHART_DIR}/files/alerts.yaml"
dash_src="${REPO_ROOT}/grafana/dashboards"
dash_dst="${CHART_DIR}/files/dashboards"

if [[ ! -f "${CHART_DIR}/Chart.yaml" ]]; then
    echo "sync-chart-files: no chart at ${CHART_DIR}" >&2
    exit 1
fi

mkdir -p "${CHART_DIR}/files" "${dash_dst}"

if [[ -f "${rules_src}" ]]; then
    cp -- "${rules_src}" "${rules_dst}"
    echo "sync-chart-files: ${rules_src#"${REPO_ROOT}"/} -> ${rules_dst#"${REPO_ROOT}"/}"
else
    rm -f -- "${rules_dst}"
    echo "sync-chart-files: warning: ${rules_src#"${REPO_ROOT}"/} does not exist; no rules in the chart" >&2
fi

shopt -s nullglob
sources=("${dash_src}"/*.json)
shopt -u nullglob

# Drop chart copies whose source is gone.
for copy in "${dash_dst}"/*.json; do
    [[ -e "${copy}" ]] || continue
    if [[ ! -f "${dash_src}/$(basename -- "${copy}")" ]]; then
        rm -f -- "${copy}"
        echo "sync-chart-files: removed stale ${copy#"${REPO_ROOT}"/}"
    fi
done

if ((${#sources[@]} == 0)); then
    echo "sync-chart-files: warning: no dashboards in ${dash_src#"${REPO_ROOT}"/}" >&2
fi
for src in "${sources[@]}"; do
    cp -- "${src}" "${dash_dst}/"
    echo "sync-chart-files: ${src#"${REPO_ROOT}"/} -> ${dash_dst#"${REPO_ROOT}"/}/"
done
