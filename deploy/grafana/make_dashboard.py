"""Generate deploy/grafana/dashboards/nccr-guard.json (run after changing a panel; the JSON is committed)."""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "prometheus"}
M = 'model=~"$model"'
PANELS = [
    (
        "Verdicts per second",
        "timeseries",
        [(f"sum by (verdict) (rate(nccr_guard_verdicts_total{{{M}}}[1m]))", "{{verdict}}")],
        "reqps",
    ),
    (
        "Adversarial share",
        "timeseries",
        [
            (
                f'sum(rate(nccr_guard_verdicts_total{{{M},verdict="adversarial"}}[5m])) '
                f"/ clamp_min(sum(rate(nccr_guard_verdicts_total{{{M}}}[5m])), 1e-9)",
                "adversarial share",
            )
        ],
        "percentunit",
    ),
    (
        "Request latency p50 / p95 / p99",
        "timeseries",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate(nccr_guard_request_duration_seconds_bucket"
                f'{{endpoint=~"/v1/detect|/v1/guard|/v2/models/{{name}}/infer"}}[1m])))',
                f"p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        "s",
    ),
    (
        "Queue wait vs compute (p50, p99)",
        "timeseries",
        [
            (
                f"histogram_quantile({q}, sum by (le) (rate(nccr_guard_{m}_seconds_bucket{{{M}}}[1m])))",
                f"{m} p{int(q * 100)}",
            )
            for m in ("queue_wait", "compute")
            for q in (0.5, 0.99)
        ],
        "s",
    ),
    (
        "Batch size (inputs per batch)",
        "heatmap",
        [(f"sum by (le) (rate(nccr_guard_batch_requests_bucket{{{M}}}[1m]))", "{{le}}")],
        "short",
    ),
    (
        "Mean batch: inputs and rows",
        "timeseries",
        [
            (
                f"sum(rate(nccr_guard_batch_{k}_sum{{{M}}}[1m])) "
                f"/ clamp_min(sum(rate(nccr_guard_batch_{k}_count{{{M}}}[1m])), 1e-9)",
                f"{legend} per batch",
            )
            for k, legend in (("requests", "inputs"), ("rows", "rows"))
        ],
        "short",
    ),
    (
        "Rows per verdict (below the fixed-K rows when sequential testing stops early)",
        "timeseries",
        [
            (
                f"sum by (model) (rate(nccr_guard_verdict_passes_sum{{{M}}}[1m])) "
                f"/ clamp_min(sum by (model) (rate(nccr_guard_verdict_passes_count{{{M}}}[1m])), 1e-9)",
                "{{model}}",
            )
        ],
        "short",
    ),
    (
        "Queue depth and in-flight requests",
        "timeseries",
        [
            (f"sum by (model) (nccr_guard_queue_depth{{{M}}})", "queued {{model}}"),
            ("sum(nccr_guard_in_flight_requests)", "in flight"),
        ],
        "short",
    ),
    (
        "Event loop lag p99 (HTTP work waiting outside the request timings)",
        "timeseries",
        [
            (
                "histogram_quantile(0.99, sum by (le, instance) (rate(nccr_guard_event_loop_lag_seconds_bucket[1m])))",
                "{{instance}}",
            )
        ],
        "s",
    ),
    (
        "Garbage-collection pauses (time per second, by generation)",
        "timeseries",
        [
            (
                "sum by (generation, instance) (rate(nccr_guard_gc_pause_seconds_sum[1m]))",
                "gen {{generation}} {{instance}}",
            )
        ],
        "s",
    ),
    (
        "Rejections by reason",
        "timeseries",
        [("sum by (reason) (rate(nccr_guard_rejections_total[1m]))", "{{reason}}")],
        "reqps",
    ),
    (
        "Connections closed to even out workers (--processes N)",
        "timeseries",
        [("sum by (instance) (rate(nccr_guard_connections_rebalanced_total[1m]))", "{{instance}}")],
        "ops",
    ),
    (
        "Access-log lines dropped (stdout not drained)",
        "timeseries",
        [("sum by (instance) (rate(nccr_guard_access_log_dropped_total[1m]))", "{{instance}}")],
        "ops",
    ),
    (
        "Responses by status code",
        "timeseries",
        [(f"sum by (code) (rate(nccr_guard_requests_total{{{M}}}[1m]))", "{{code}}")],
        "reqps",
    ),
    (
        "NCCR score distribution",
        "heatmap",
        [(f"sum by (le) (rate(nccr_guard_score_bucket{{{M}}}[1m]))", "{{le}}")],
        "short",
    ),
    (
        "Served models",
        "table",
        [("max by (model, modality, backend, device, variant, k) (nccr_guard_model_info)", "")],
        "short",
    ),
    ("Ready", "stat", [("min(nccr_guard_ready)", "ready")], "short"),
]


def panel(i: int, title: str, kind: str, targets: list, unit: str) -> dict:
    p = {
        "id": i + 1,
        "title": title,
        "type": kind,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {
                "datasource": DS,
                "expr": e,
                "legendFormat": leg,
                "refId": chr(65 + j),
                **({"format": "heatmap"} if kind == "heatmap" else {}),
                **({"format": "table", "instant": True} if kind == "table" else {}),
            }
            for j, (e, leg) in enumerate(targets)
        ],
    }
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": unit}}
    return p


def dashboard() -> dict:
    return {
        "uid": "nccr-guard",
        "title": "nccr-guard",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "tags": ["nccr-guard"],
        "templating": {
            "list": [
                {
                    "name": "model",
                    "type": "query",
                    "datasource": DS,
                    "query": "label_values(nccr_guard_model_info, model)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                    "allValue": ".*",
                }
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


if __name__ == "__main__":
    out = Path(__file__).parent / "dashboards" / "nccr-guard.json"
    out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(out)
