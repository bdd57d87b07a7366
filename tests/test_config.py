"""Configuration: defaults, then TOML, then PYSERVER_* variables, then flags; bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyserver.config import Config, ConfigError, load_config
from pyserver.servicekey import load_or_create_service_key


def test_defaults_are_a_loopback_single_node_cell() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.host == "127.0.0.1"
    assert config.data_dir == Path("pyserver-data")


def test_later_sources_win(tmp_path: Path) -> None:
    toml = tmp_path / "pyserver.toml"
    toml.write_text('port = 7001\nhttp_port = 7002\nnode_id = "from-file"\n')
    config = load_config(
        toml,
        env={"PYSERVER_PORT": "7003", "PYSERVER_CACHE_MAX_USERS": "5"},
        overrides={"port": 7004},
    )
    assert config.port == 7004  # flag over environment over file
    assert config.http_port == 7002  # file
    assert config.node_id == "from-file"
    assert config.cache_max_users == 5  # environment, converted to int


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('data_dir = "/srv/cell"\n')
    assert load_config(env={"PYSERVER_CONFIG": str(toml)}).data_dir == Path("/srv/cell")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown setting 'colour'"),
        ('port = "many"\n', "config port: 'many' is not a valid int"),
        ("port = 70000\n", "not a TCP port"),
        ("snapshot_every = 0\n", "must be positive"),
        ('default_folder = "spam"\n', "is not inbox or other"),
        ("port = \n", "config file"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, text: str, message: str) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(toml, env={})


def test_bad_environment_values_are_named() -> None:
    with pytest.raises(ConfigError, match="request_timeout_s"):
        load_config(env={"PYSERVER_REQUEST_TIMEOUT_S": "soon"})


def test_service_key_is_created_once_and_kept(tmp_path: Path) -> None:
    first = load_or_create_service_key(tmp_path / "d")
    assert load_or_create_service_key(tmp_path / "d") == first
    assert (tmp_path / "d" / "service.key").stat().st_mode & 0o777 == 0o600
    config = Config(data_dir=tmp_path / "d").with_service_key()
    assert config.service_key == first


def test_service_processes_take_the_configured_limits_and_store(tmp_path: Path) -> None:
    from pyserver.addresses import DataCentre
    from pyserver.app.server import ServerLimits
    from pyserver.processes.dirty import DirtyProcess
    from pyserver.processes.userindex import UserIndexProcess
    from pyserver.store.hbase import HBaseStore

    config = load_config(
        env={},
        overrides={
            "data_dir": tmp_path,
            "max_in_flight_per_connection": 7,
            "idle_timeout_s": 11.0,
            "request_timeout_s": 3.0,
            "store": "hbase:127.0.0.1:9/limitsns",
        },
    )
    limits = ServerLimits(max_in_flight=7, idle_timeout_s=11.0, request_timeout_s=3.0)
    assert ServerLimits.from_config(config) == limits
    index = UserIndexProcess.from_config(config)
    assert index.server.limits == limits
    assert isinstance(index.store, HBaseStore)  # not the embedded store it used to force
    centre = DataCentre.parse("east=127.0.0.1:9")  # never contacted: the process is not started
    assert DirtyProcess(config, [centre]).server.limits == limits
