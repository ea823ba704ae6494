"""CLI, settings and start-up refusals."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gateway.settings import Settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_env_vars_and_flags_fill_every_setting():
    env = {f"IMAGEGATE_{name.upper()}": value for name, value in
           (("port", "9001"), ("max_batch_images", "3"), ("compile", "true"), ("host", "0.0.0.0"))}
    s = Settings.from_sources({"port": 9002}, environ=env)
    assert (s.port, s.max_batch_images, s.compile, s.host) == (9002, 3, True, "0.0.0.0")
    assert s.engine_config().max_batch_images == 3


def test_help_lists_every_flag_with_its_env_var():
    out = run_cli("serve", "--help").stdout
    for name in Settings.__struct_fields__:
        assert "--" + name.replace("_", "-") in out
        assert "IMAGEGATE_" + name.upper() in out


def test_missing_model_fails_at_start_saying_where_it_looked(tmp_path):
    missing = tmp_path / "no-such-model"
    res = run_cli("serve", str(missing))
    assert res.returncode == 2
    assert "not found" in res.stderr and str(missing) in res.stderr
    res = run_cli("serve", "someorg/some-sdxl", env={"HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 2
    assert "hub cache" in res.stderr and "--allow-download" in res.stderr


def test_refuses_open_non_loopback_bind():
    res = run_cli("serve", "--host", "0.0.0.0")
    assert res.returncode == 2
    assert "--insecure-no-auth" in res.stderr


def test_readme_documents_every_setting():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("<!-- settings:start -->")[1].split("<!-- settings:end -->")[0]
    documented = set(re.findall(r"`--([a-z0-9-]+)`", table))
    assert documented == {n.replace("_", "-") for n in Settings.__struct_fields__}
