"""Configuration: precedence, one-line errors naming the key, docs that match the code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from exporter import config
from exporter.telemetry.metrics import METRICS
from exporter.track import hostnames

ROOT = Path(__file__).resolve().parent.parent
BROKER = ["--broker-url", "redis://localhost:6379/0"]


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path: Path) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text(
        "port: 1111\nworker_timeout: 11\ndefault_queue: from-file\nbroker_url: redis://file/0\n"
    )
    loaded = config.load(
        ["--config", str(path), "--port", "3333"],
        environ={"CELERY_EXPORTER_PORT": "2222", "CELERY_EXPORTER_WORKER_TIMEOUT": "22"},
    )
    assert loaded.port == 3333
    assert loaded.worker_timeout == 22.0
    assert loaded.default_queue == "from-file"
    assert loaded.broker_url == "redis://file/0"
    assert loaded.max_tracked_tasks == 100_000


def test_the_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "exporter.yaml"
    path.write_text("broker_url: amqp://guest@rabbit//\n")
    loaded = config.load([], environ={"CELERY_EXPORTER_CONFIG": str(path)})
    assert loaded.broker_url == "amqp://guest@rabbit//"


def test_repeatable_and_list_options() -> None:
    loaded = config.load(
        [
            *BROKER,
            "--static-label",
            "cluster=eu",
            "--static-label",
            "env=prod",
            "--broker-transport-option",
            "global_keyprefix=app:",
            "--broker-transport-option",
            "priority_steps=[0,5]",
            "--runtime-buckets",
            "0.1,1,10",
        ],
        environ={},
    )
    assert loaded.static_labels == {"cluster": "eu", "env": "prod"}
    assert loaded.broker_transport_options == {"global_keyprefix": "app:", "priority_steps": [0, 5]}
    assert loaded.runtime_buckets == (0.1, 1.0, 10.0)


@pytest.mark.parametrize(
    ("argv", "environ", "file", "message"),
    [
        (["--port", "99999"], {}, None, "port: expected an integer from 0 to 65535, got '99999'"),
        (
            [],
            {"CELERY_EXPORTER_WORKER_TIMEOUT": "soon"},
            None,
            "worker_timeout: expected a number of at least 1, got 'soon' "
            "(from CELERY_EXPORTER_WORKER_TIMEOUT)",
        ),
        (
            [],
            {"CELERY_EXPORTER_BROKER_ULR": "x"},
            None,
            "unknown environment variable CELERY_EXPORTER_BROKER_ULR (did you mean broker_url?)",
        ),
        ([], {}, "max_tracked_taks: 5\n", "max_tracked_taks: unknown key in"),
        ([], {}, "log_format: xml\n", "log_format: expected one of text, json, got 'xml'"),
        ([], {}, "runtime_buckets: [1, 0.5]\n", "runtime_buckets: expected increasing positive"),
        ([], {}, "static_labels: {'bad-label': x}\n", "static_labels: 'bad-label' is not a valid"),
        (
            ["--task-hostname-label", "sum"],
            {},
            None,
            "task_hostname_label: expected one of keep, drop, got 'sum' "
            "(from --task-hostname-label)",
        ),
        (
            ["--task-hostname-rewrite", "^(celery@.+-[0-9]+$=\\1"],
            {},
            None,
            "task_hostname_rewrite: pattern '^(celery@.+-[0-9]+$' does not compile: missing ),",
        ),
        (
            [],
            {},
            "task_hostname_rewrite: {pattern: '^(celery@.+)-[0-9]+$', replacement: '\\2'}\n",
            "task_hostname_rewrite: replacement '\\\\2' for '^(celery@.+)-[0-9]+$': invalid group",
        ),
        (
            [],
            {"CELERY_EXPORTER_TASK_HOSTNAME_REWRITE": "^(?P<app>celery@.+)-[0-9]+$=\\g<ap>"},
            None,
            "unknown group name 'ap' (from CELERY_EXPORTER_TASK_HOSTNAME_REWRITE)",
        ),
        ([], {}, "task_hostname_rewrite: [{pattern: x}]\n", "task_hostname_rewrite: expected"),
        ([], {}, "- a list\n", "config: "),
        ([], {}, "port: [\n", "config: "),
    ],
)
def test_mistakes_name_the_key(
    tmp_path: Path, argv: list[str], environ: dict[str, str], file: str | None, message: str
) -> None:
    if file is not None:
        path = tmp_path / "exporter.yaml"
        path.write_text(file)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(config.ConfigError) as caught:
        config.load([*BROKER, *argv], environ=environ)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_broker_url_is_required() -> None:
    with pytest.raises(config.ConfigError, match=r"^broker_url: required"):
        config.load([], environ={})
    assert config.load(["--demo"], environ={}).demo


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("nosuchscheme://x", "broker_url: unknown transport 'nosuchscheme' in nosuchscheme://x"),
        ("amqp://h:abc//", "broker_url: amqp://h:abc//: Port could not be cast"),
        ("redis://h:99999999/0", "broker_url: redis://h:99999999/0: Port out of range"),
        ("amqp://[::1//", "broker_url: amqp://[::1//: Invalid IPv6 URL"),
        ("rabbit.example.com", "broker_url: 'rabbit.example.com' is not a URL"),
        ("://x", "broker_url: '://x' is not a URL"),
        ("   ", "broker_url: '' is not a URL"),
        ("redis://h:6379/one", "broker_url: redis://h:6379/one: a Redis database is a number"),
        ("amqp://u:s3cret@h:x//", "broker_url: amqp://u:****@h:x//: Port could not be cast"),
        ("sentinel://h:1;nosuch://h:2", "broker_url: unknown transport 'nosuch' in nosuch://h:2"),
    ],
)
def test_a_broker_url_mistake_names_the_key(url: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load(["--broker-url", url], environ={})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (
            [*BROKER, "--port", "x"],
            "port: expected an integer from 0 to 65535, got 'x' (from --port)",
        ),
        (
            ["--broker-url", "nosuchscheme://x"],
            "broker_url: unknown transport 'nosuchscheme' in nosuchscheme://x",
        ),
        (
            [*BROKER, "--task-hostname-rewrite", "^(celery@.+)-[0-9]+$=\\g<app>"],
            "task_hostname_rewrite: replacement '\\\\g<app>' for '^(celery@.+)-[0-9]+$': "
            "unknown group name 'app' (from --task-hostname-rewrite)",
        ),
    ],
)
def test_the_command_line_exits_2_with_one_line(argv: list[str], error: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr == f"celery-events-exporter: error: {error}\n"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis:6379/0", "redis://:****@redis:6379/0"),
        ("amqp://user:s3cret@rabbit:5672//", "amqp://user:****@rabbit:5672//"),
        ("amqp://u:a@b@h//;amqp://u:s3cret@h2//", "amqp://u:****@h//;amqp://u:****@h2//"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("sentinel://:s3cret@s1:26379", "sentinel://:****@s1:26379"),
    ],
)
def test_passwords_are_masked(url: str, shown: str) -> None:
    assert config.mask_url(url) == shown


def test_the_example_file_documents_every_key_and_loads() -> None:
    path = ROOT / "config" / "exporter.example.yaml"
    keys = set(yaml.safe_load(path.read_text()))
    assert keys == {spec.name for spec in config.Config.options()}
    config.load(["--config", str(path)], environ={})


def test_the_readme_documents_every_option_and_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \| `--", readme, re.MULTILINE))
    assert documented == {spec.name for spec in config.Config.options()}
    metrics = set(
        re.findall(r"^\| `((?:celery|flower)_[a-z_]+)` \| [a-z]+ \|", readme, re.MULTILINE)
    )
    assert metrics == {spec.name for spec in METRICS}


def test_help_groups_options_by_purpose() -> None:
    text = config.build_parser().format_help()
    for group in ("broker:", "events:", "workers:", "metrics:", "HTTP endpoint:", "logging:"):
        assert f"\n{group}\n" in text
    assert "CELERY_EXPORTER_BROKER_URL" in text


def test_hostname_rewrites_from_flags_environment_and_file(tmp_path: Path) -> None:
    deployment, statefulset = r"^(celery@.+)-[0-9a-f]{8,10}-[0-9a-z]{5}$", r"^(celery@.+)-[0-9]+$"
    path = tmp_path / "exporter.yaml"
    path.write_text(
        f"task_hostname_rewrite:\n  - {{pattern: '{deployment}', replacement: '\\1'}}\n"
        f"  - {{pattern: '{statefulset}', replacement: '\\1'}}\n"
    )
    sources = {
        "file": ([*BROKER, "--config", str(path)], {}),
        "flags": ([*BROKER, "--task-hostname-rewrite", f"{deployment}=\\1",
                   "--task-hostname-rewrite", f"{statefulset}=\\1"], {}),
        "environment": (BROKER, {"CELERY_EXPORTER_TASK_HOSTNAME_REWRITE": json.dumps(
            [{"pattern": deployment, "replacement": "\\1"},
             {"pattern": statefulset, "replacement": "\\1"}])}),
    }  # fmt: skip
    for source, (argv, environ) in sources.items():
        rules = config.load(argv, environ=environ).task_hostname_rewrite
        rewrite = hostnames.rewriter(rules)
        hosts = ("celery@web-7d9f8b6c4-x2kqp", "celery@reports-3", "celery@laptop")
        expected = ["celery@web", "celery@reports", "celery@laptop"]
        assert [rewrite(host) for host in hosts] == expected, source
    assert config.load(BROKER, environ={}).task_hostname_label == "keep"
