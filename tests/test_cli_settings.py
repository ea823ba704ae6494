"""CLI, settings and start-up refusals."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_local_model_not_found_does_not_talk_about_the_hub(tmp_path):
    res = run_cli("serve", str(tmp_path / "weights" / "sdxl"))
    assert res.returncode == 2
    assert "not found" in res.stderr
    assert "hub" not in res.stderr and "--allow-download" not in res.stderr


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--port", "99999"], {}, ["--port"]),
        (["--port", "abc"], {}, ["--port"]),
        (["--max-batch-images", "0"], {}, ["--max-batch-images"]),
        (["--log-level", "verbose"], {}, ["--log-level"]),
        ([], {"IMAGEGATE_INSECURE_NO_AUTH": "maybe"}, ["IMAGEGATE_INSECURE_NO_AUTH"]),
        ([], {"IMAGEGATE_WARMUP_SIZES": "64x"}, ["IMAGEGATE_WARMUP_SIZES"]),
        (["--max-queue-images", "-1", "--request-timeout-s", "soon"], {},
         ["--max-queue-images", "--request-timeout-s"]),
        (["--min-size", "512", "--max-size", "256"], {}, ["--min-size"]),
        (["--batch-buckets", "0,4", "--compile-shapes", "static"], {}, ["--batch-buckets"]),
        ([], {"IMAGEGATE_BATCH_BUCKETS": "2,16"}, ["IMAGEGATE_BATCH_BUCKETS"]),
        (["--compile-shapes", "fixed"], {}, ["--compile-shapes"]),
        (["--compile-shapes", "batch"], {}, ["--compile-shapes"]),
        ([], {"IMAGEGATE_COMPILE_MODE": "fast"}, ["IMAGEGATE_COMPILE_MODE"]),
        ([], {"IMAGEGATE_COMPILE_METHOD": "ahead"}, ["IMAGEGATE_COMPILE_METHOD"]),
        (["--compile-method", "aot", "--compile-scope", "unet", "--compile-shapes", "batch",
          "--compile-mode", "reduce-overhead"], {}, ["--compile-method"]),
        # One line: the batch shape aot resolved to is not reported as if it had been asked for.
        (["--compile-method", "aot", "--compile-scope", "blocks"], {}, ["--compile-method"]),
    ],
)
def test_bad_settings_stop_the_start_with_one_line_each(args, env, names):
    res = run_cli("serve", *args, env=env)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == len(names), res.stderr
    for line, name in zip(lines, names, strict=True):
        assert line.startswith(f"imagegate: {name}:"), line


def test_ahead_of_time_compile_names_every_setting_it_needs():
    res = run_cli("serve", "--compile-method", "aot", "--quantize", "fp8",
                  "--compile-scope", "blocks", "--compile-shapes", "dynamic")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert line.startswith("imagegate: --compile-method: aot needs"), line
    for needed in ("--compile-scope unet or full", "--compile-shapes batch", "--quantize none"):
        assert needed in line, line
    assert "--compile-mode" not in line, "the default mode was reported as a problem"


@pytest.mark.parametrize(
    ("values", "recipe"),
    [
        # No compile flag: the whole UNet and one image's decoder ahead of time (built in the
        # background).
        ({}, ("full", "batch", "aot")),
        ({"compile_method": "aot"}, ("full", "batch", "aot")),
        ({"compile_method": "aot", "compile_scope": "unet"}, ("unet", "batch", "aot")),
        ({"compile_mode": "max-autotune-no-cudagraphs"}, ("full", "batch", "aot")),
        # A flag aot cannot honour, or any recipe flag: jit with the defaults it always had.
        ({"quantize": "fp8"}, ("blocks", "dynamic", "jit")),
        ({"compile_mode": "reduce-overhead"}, ("blocks", "dynamic", "jit")),
        ({"compile_method": "jit"}, ("blocks", "dynamic", "jit")),
        ({"compile_scope": "unet", "compile_shapes": "batch"}, ("unet", "batch", "jit")),
        ({"compile_scope": "full"}, ("full", "dynamic", "jit")),
    ],
)
def test_the_compile_recipe_resolves_auto(values, recipe):
    settings = Settings.from_sources(values, environ={})
    assert settings.compile_recipe() == recipe
    config = settings.engine_config()
    assert (config.compile_scope, config.compile_shapes, config.compile_method) == recipe


def test_friendly_spellings_and_empty_variables():
    s = Settings.from_sources(environ={"IMAGEGATE_INSECURE_NO_AUTH": "yes", "IMAGEGATE_PORT": "",
                                       "IMAGEGATE_COMPILE": "off", "IMAGEGATE_LOG_LEVEL": "DEBUG"})
    assert (s.insecure_no_auth, s.port, s.compile, s.log_level) == (True, 8000, False, "debug")
    assert Settings.from_sources(environ={"IMAGEGATE_INSECURE_NO_AUTH": "0"}).insecure_no_auth is False


def test_missing_or_broken_keys_file_is_a_start_up_error(tmp_path):
    missing = tmp_path / "no-such-keys.json"
    res = run_cli("serve", "--keys-file", str(missing))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(missing) in res.stderr and len(res.stderr.strip().splitlines()) == 1
    broken = tmp_path / "broken.json"
    broken.write_text('{"clients": [')
    res = run_cli("serve", "--keys-file", str(broken))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(broken) in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_broken_edit_keeps_the_old_keys_and_logs_an_error(tmp_path, caplog):
    import os

    from auth.keys import KeysFile, KeyStore, new_client, save_keys_file

    path = tmp_path / "keys.json"
    record, key, _ = new_client("alice")
    save_keys_file(path, KeysFile(clients=[record]))
    store = KeyStore.from_config("", path)
    assert store.by_key(key).id == "alice"
    path.write_text("{ half a file")
    os.utime(path, ns=(1, 1))  # a changed mtime, whatever the clock's resolution
    with caplog.at_level("ERROR", logger="auth.keys"):
        assert store.by_key(key).id == "alice"
    assert any(str(path) in r.getMessage() for r in caplog.records)
    path.unlink()
    assert store.enabled and store.by_key(key).id == "alice"


def test_version_and_help_without_none_defaults():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stdout.startswith("imagegate ")
    out = run_cli("serve", "--help").stdout
    assert "(default: None)" not in out


def test_keys_create_refuses_unknown_scopes_and_delete_removes(tmp_path):
    from auth.keys import load_keys_file

    keys = str(tmp_path / "keys.json")
    res = run_cli("keys", "create", "--keys-file", keys, "--id", "a", "--scopes", "openai,dalle")
    assert res.returncode == 2 and "'dalle'" in res.stderr and "openai" in res.stderr
    assert run_cli("keys", "create", "--keys-file", keys, "--id", "a",
                   "--scopes", "openai,baidu").returncode == 0
    assert run_cli("keys", "create", "--keys-file", keys, "--id", "b").returncode == 0
    res = run_cli("keys", "delete", "--keys-file", keys, "a")
    assert res.returncode == 0
    assert [c.id for c in load_keys_file(tmp_path / "keys.json").clients] == ["b"]
    assert run_cli("keys", "delete", "--keys-file", keys, "a").returncode == 1


def test_start_up_warnings():
    s = Settings.from_sources({"host": "0.0.0.0", "token_ttl_s": 600}, environ={})
    warnings = " ".join(s.startup_warnings())
    assert "Host header" in warnings and "--public-url" in warnings
    assert "3600" in warnings
    buckets = Settings.from_sources({"public_url": "https://img.example",
                                     "batch_buckets": "1,4"}, environ={})
    assert "--compile-shapes" in " ".join(buckets.startup_warnings())
    quiet = Settings.from_sources({"public_url": "https://img.example"}, environ={})
    assert quiet.startup_warnings() == []


def test_unreachable_redis_stops_the_start_with_one_line(tmp_path):
    """--redis-url that does not answer (within the start's wait): one line, no traceback, and
    no password from the URL."""
    from tests.serving import free_port

    res = run_cli("serve", "--redis-url", "redis://user:s3cret@127.0.0.1:1/0",
                  "--redis-wait-s", "1", "--port",
                  str(free_port()), "--data-dir", str(tmp_path / "data"))
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "s3cret" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("imagegate: cannot reach Redis at redis://***@127.0.0.1:1/0"), last
