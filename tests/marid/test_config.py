import subprocess
import sys
from pathlib import Path

import pytest

from marid import config

VALID = """
server:
  url: https://ci.example.com/
database:
  dsn: postgresql://u:p@127.0.0.1/marid
crypto:
  key: 0123456789abcdef0123456789abcdef
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "marid.yml"
    path.write_text(text)
    return path


def test_minimal_file_gets_documented_defaults(tmp_path: Path):
    cfg = config.load(write(tmp_path, VALID))
    assert cfg.server.url == "https://ci.example.com"
    assert cfg.server.api_url == "https://ci.example.com/api"
    assert cfg.drivers == ["docker"]
    assert cfg.objects.max_size == 5 * 1024**2
    assert cfg.images.max_size == 10 * 1024**3
    assert cfg.builds.timeout == 1800
    assert cfg.limits.max.memory == 4 * 1024**3 and cfg.limits.max.pids == 4096
    assert cfg.cron.interval == 60
    assert cfg.webhooks.allow_loopback is False
    assert cfg.docker.pull == "if-not-present"


@pytest.mark.parametrize(
    ("value", "policy"),
    [
        ("never", "never"),
        ("if-not-present", "if-not-present"),
        ("always", "always"),
        # The key's old booleans keep their meaning: true pulled images the engine lacked.
        ("true", "if-not-present"),
        ("false", "never"),
    ],
)
def test_docker_pull_is_a_pull_policy(tmp_path: Path, value: str, policy: str):
    cfg = config.load(write(tmp_path, VALID + f"docker: {{pull: {value}}}\n"))
    assert cfg.docker.pull == policy


def test_example_file_loads_and_matches_the_defaults():
    example = config.load(Path(__file__).parents[2] / "config.example.yaml")
    minimal = config.from_dict(
        {
            "server": {"url": "https://ci.example.com"},
            "database": {"dsn": example.database.dsn},
            "crypto": {"key": example.crypto.key},
            # An example value, like the DSN: the bucket has no default.
            "storage": {"s3": {"bucket": example.storage.s3.bucket}},
        }
    )
    assert example == minimal


def test_sizes_durations_and_partial_sections(tmp_path: Path):
    text = (
        VALID + "objects: {max_size: 10k}\nbuilds: {timeout: 1h30m}\nlimits: {max: {memory: 3G}}\n"
    )
    cfg = config.load(write(tmp_path, text))
    assert cfg.objects.max_size == 10240
    assert cfg.builds.timeout == 5400
    assert cfg.limits.max.memory == 3 * 1024**3
    assert cfg.limits.max.cpus == 2  # untouched keys keep their own defaults


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("serverx: 1\n", "serverx: unknown key"),
        ("server: {url: https://a, colour: red}\n", None),
        ("objects: {max_size: lots}\n", "objects.max_size: must be a size such as 512m or 2g"),
        ("builds: {timeout: 5 minutes}\n", "builds.timeout: must be a duration"),
        (
            "webhooks: {allow_loopback: yes please}\n",
            "webhooks.allow_loopback: must be true or false",
        ),
        ("webhooks: {attempts: 0}\n", "webhooks.attempts: must be at least 1"),
        (
            "rate_limit: {trusted_proxies: [10.0.0.0/8, proxy]}\n",
            "rate_limit.trusted_proxies: 'proxy' is no IP address or network",
        ),
        ("rate_limit: {window: 0s}\n", "rate_limit.window: must be longer than 0s"),
        ("builds: {max_output: 0}\n", "builds.max_output: must be at least 64k"),
        ("reaper: {interval: 0s}\n", "reaper.interval: must be longer than 0s"),
        (
            "server: {url: https://ci.example.com, header_timeout: 0s}\n",
            "server.header_timeout: must be longer than 0s",
        ),
        (
            "server: {url: https://ci.example.com, body_timeout: 0s}\n",
            "server.body_timeout: must be longer than 0s",
        ),
        ("drivers: docker\n", "drivers: must be a list of strings"),
        (
            "docker: {pull: sometimes}\n",
            "docker.pull: must be one of never, if-not-present, always, not 'sometimes'",
        ),
        ("docker: {pull: 1}\n", "docker.pull: must be one of never, if-not-present, always, not 1"),
        ("docker: {prepare_ahead: -1}\n", "docker.prepare_ahead: must be a non-negative integer"),
        ("docker: {prepare_ahead: 9}\n", "docker.prepare_ahead: must be from 0 to 8"),
        ("drivers: [warp]\n", "drivers: unknown driver 'warp'"),
        (
            "database: {dsn: x, pool_size: -1}\n",
            "database.pool_size: must be a non-negative integer",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, extra: str, message: str | None):
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(tmp_path, VALID + extra))
    text = str(caught.value)
    assert "\n" not in text
    assert (message or "server.colour: unknown key") in text


def test_missing_required_key(tmp_path: Path):
    with pytest.raises(config.ConfigError, match=r"database\.dsn: required key is missing"):
        config.load(write(tmp_path, "server: {url: https://a}\ncrypto: {key: " + "k" * 32 + "}\n"))


def test_yaml_syntax_error_gives_line(tmp_path: Path):
    with pytest.raises(config.ConfigError, match=r"YAML syntax error \(line 3"):
        config.load(write(tmp_path, "server:\n  url: x\n bad: [\n"))


def test_short_crypto_key_is_refused(tmp_path: Path):
    with pytest.raises(config.ConfigError, match=r"crypto\.key: must be at least 32 characters"):
        config.load(write(tmp_path, VALID.replace("0123456789abcdef0123456789abcdef", "short")))


def test_cli_reports_bad_config_in_one_line_with_status_2(tmp_path: Path):
    path = write(tmp_path, VALID + "bogus: true\n")
    result = subprocess.run(
        [sys.executable, "-m", "marid", "--config", str(path), "migrate"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"marid: configuration error: {path}: bogus: unknown key\n"
    assert result.stdout == ""


def test_missing_file_is_a_config_error(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MARID_CONFIG", raising=False)
    result = subprocess.run(
        [sys.executable, "-m", "marid", "migrate"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "marid.yml: file not found" in result.stderr
    assert "Traceback" not in result.stderr
