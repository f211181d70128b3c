from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_examples_load(path: Path) -> None:
    cfg = load_config(path)
    assert all(getattr(cfg, role).replicas >= 1 for role in cfg.roles)


def test_aggregated_mode_uses_its_own_section() -> None:
    cfg = parse_config({"mode": "aggregated", "aggregated": {"replicas": 2, "batching": "static"}})
    assert cfg.roles == ("aggregated",) and cfg.aggregated.batching == "static"
    assert parse_config({}).roles == ("prefill", "decode")


def test_defaults_and_frozen() -> None:
    cfg = parse_config({})
    assert cfg.model.path == "default" and cfg.server.port == 50051
    with pytest.raises(Exception):
        cfg.prefill.replicas = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"prefill": {"replicas": 0}}, "prefill.replicas"),
        ({"model": {"device": "tpu"}}, "model.device"),
        ({"decode": {"max_batch_size": "lots"}}, "decode.max_batch_size"),
        ({"kv_cache": {"num_blocks": 4}}, "kv_cache.num_blocks"),
        ({"transport": {"backend": "nccl"}}, "transport.backend"),
        ({"model": {"device": "cuda"}}, "num_gpus"),
        ({"prefill": {"replicaz": 2}}, "prefill.replicaz"),
        ({"limits": {"max_prompt_tokens": 5000}}, "limits.max_prompt_tokens"),
        ({"mode": "mixed"}, "mode"),
        ({"aggregated": {"batching": "dynamic"}}, "aggregated.batching"),
        ({"mode": "aggregated", "model": {"device": "cuda"}}, "aggregated.num_gpus"),
    ],
)
def test_bad_values_name_the_field(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert needle in str(e.value)


def test_bad_value_shows_what_was_given_and_allowed() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"model": {"device": "tpu"}})
    msg = str(e.value)
    assert "'tpu'" in msg and "cpu" in msg and "cuda" in msg


def test_cli_overrides_win(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("server: {port: 1234}\nmodel: {path: tiny}\n")
    cfg = load_config(f, {"server": {"port": 4321, "host": None}})
    assert cfg.server.port == 4321 and cfg.model.path == "tiny"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prefill: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
