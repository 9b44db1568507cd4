"""kmsd.config: every option of a node's TOML file, the three secret sources, and the errors."""

from __future__ import annotations

import os

import pytest

from kmsd import config
from kmsd.config import ConfigError, SecretSource
from kmsd.dev.cluster import DevClusterOptions, DevNode, write_node_files

FULL = """\
[node]
id = "node-a"
az = "eu-west-1a"
data_dir = "/var/lib/kmsd/node-a"
scheduler_interval_seconds = 2.5

[api]
listen = "0.0.0.0:8443"
admin_listen = "127.0.0.1:8444"
public_url = "https://kms-a.example.net:8443"
admin_url = "https://kms-a.example.net:8444"

[raft]
address = "kms-a.example.net:7900"
peers = ["kms-b.example.net:7900", "kms-c.example.net:7900"]
{raft_secret}

[cluster]
regions = ["eu-west-1", "eu-central-1"]
account_id = "111122223333"

[hsm]
module = "/opt/hsm/lib/libvendor.so"
token_label = "kmsd-node-a"
{hsm_secret}
softhsm2_conf = "/etc/kmsd/node-a.softhsm2.conf"

[testing]
clock_offset_file = "/tmp/offset"
"""

MINIMAL = """\
[node]
id = "node-1"
data_dir = "/var/lib/kmsd"

[api]
listen = "127.0.0.1:7700"
admin_listen = "127.0.0.1:7800"

[raft]
address = "127.0.0.1:7900"
password_env = "KMSD_RAFT_PASSWORD"

[cluster]
regions = ["us-east-1"]
account_id = 111122223333

[hsm]
token_label = "kmsd-node-1"
pin_env = "KMSD_HSM_PIN"
"""


def _write(tmp_path, text: str, name: str = "node.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _full(tmp_path, raft_secret='password_credential = "raft-password"',
          hsm_secret='pin_credential = "pin"') -> config.NodeConfig:
    return config.load(_write(tmp_path, FULL.format(raft_secret=raft_secret,
                                                    hsm_secret=hsm_secret)))


@pytest.fixture
def credentials(tmp_path, monkeypatch):
    """A $CREDENTIALS_DIRECTORY as systemd's LoadCredential= lays it out."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "pin").write_text("1234-pin\n")
    (directory / "raft-password").write_text("raft secret value\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


# -- every field --------------------------------------------------------------


def test_every_field_of_a_full_config(tmp_path):
    cfg = _full(tmp_path)
    assert cfg.node_id == "node-a"
    assert cfg.az == "eu-west-1a"
    assert cfg.data_dir == "/var/lib/kmsd/node-a"
    assert cfg.scheduler_interval_seconds == 2.5
    assert cfg.api_listen == "0.0.0.0:8443"
    assert cfg.admin_listen == "127.0.0.1:8444"
    assert cfg.public_url == "https://kms-a.example.net:8443"
    assert cfg.admin_url == "https://kms-a.example.net:8444"
    assert cfg.raft_address == "kms-a.example.net:7900"
    assert cfg.raft_peers == ("kms-b.example.net:7900", "kms-c.example.net:7900")
    assert cfg.raft_password == SecretSource(credential="raft-password")
    assert cfg.regions == ("eu-west-1", "eu-central-1")
    assert cfg.default_region == "eu-west-1"
    assert cfg.account_id == "111122223333"
    assert cfg.hsm_module == "/opt/hsm/lib/libvendor.so"
    assert cfg.token_label == "kmsd-node-a"
    assert cfg.pin == SecretSource(credential="pin")
    assert cfg.softhsm2_conf == "/etc/kmsd/node-a.softhsm2.conf"
    assert cfg.clock_offset_file == "/tmp/offset"


def test_defaults_of_a_minimal_config(tmp_path):
    cfg = config.load(_write(tmp_path, MINIMAL))
    assert cfg.az == "default"
    assert cfg.public_url == "http://127.0.0.1:7700"
    assert cfg.admin_url == "http://127.0.0.1:7800"
    assert cfg.raft_peers == ()
    assert cfg.scheduler_interval_seconds == 10.0
    assert cfg.clock_offset_file is None
    assert cfg.softhsm2_conf is None
    assert cfg.account_id == "111122223333"  # a TOML integer is accepted
    assert cfg.hsm_module.endswith("libsofthsm2.so")
    assert cfg.pin == SecretSource(env="KMSD_HSM_PIN")
    assert cfg.raft_password == SecretSource(env="KMSD_RAFT_PASSWORD")


def test_the_dev_cluster_config_parses(tmp_path):
    node = DevNode(1, str(tmp_path / "node-1"), 7700)
    write_node_files(node, [node, DevNode(2, str(tmp_path / "node-2"), 7700)],
                     DevClusterOptions(test_clock=True), "secret")
    cfg = config.load(node.config_path)
    assert cfg.node_id == "node-1"
    assert cfg.raft_peers == ("127.0.0.1:7901",)
    assert cfg.raft_password.read("Raft password") == "secret"
    assert cfg.pin == SecretSource(file=os.path.join(node.root, "pin"))
    assert cfg.clock_offset_file == node.clock_offset_path


def test_tls_makes_the_default_urls_https(tmp_path):
    text = MINIMAL.replace('admin_listen = "127.0.0.1:7800"\n',
                           'admin_listen = "127.0.0.1:7800"\n'
                           'tls_certificate = "/etc/kmsd/tls.pem"\n'
                           'tls_key = "/run/credentials/kmsd@node-1.service/tls-key"\n')
    cfg = config.load(_write(tmp_path, text))
    assert cfg.tls_certificate == "/etc/kmsd/tls.pem"
    assert cfg.tls_key == "/run/credentials/kmsd@node-1.service/tls-key"
    assert cfg.public_url == "https://127.0.0.1:7700"
    assert cfg.admin_url == "https://127.0.0.1:7800"
    plain = config.load(_write(tmp_path, MINIMAL, "plain.toml"))
    assert plain.tls_certificate is None and plain.tls_key is None


@pytest.mark.parametrize("line", ['tls_certificate = "/etc/kmsd/tls.pem"',
                                  'tls_key = "/etc/kmsd/tls-key.pem"'])
def test_tls_certificate_and_key_go_together(tmp_path, line):
    text = MINIMAL.replace('admin_listen = "127.0.0.1:7800"\n',
                           f'admin_listen = "127.0.0.1:7800"\n{line}\n')
    with pytest.raises(ConfigError) as caught:
        config.load(_write(tmp_path, text))
    assert str(caught.value) == "api.tls_certificate and api.tls_key go together"


# -- the three secret sources -------------------------------------------------


def test_file_sources(tmp_path):
    (tmp_path / "pin").write_text("file-pin\n")
    (tmp_path / "raft.secret").write_text("  file-password  \n")
    cfg = _full(tmp_path, raft_secret=f'password_file = "{tmp_path / "raft.secret"}"',
                hsm_secret=f'pin_file = "{tmp_path / "pin"}"')
    assert cfg.pin.read("HSM PIN") == "file-pin"
    assert cfg.raft_password.read("Raft password") == "file-password"


def test_env_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("KMSD_HSM_PIN", "env-pin")
    monkeypatch.setenv("KMSD_RAFT_PASSWORD", "env-password")
    cfg = _full(tmp_path, raft_secret='password_env = "KMSD_RAFT_PASSWORD"',
                hsm_secret='pin_env = "KMSD_HSM_PIN"')
    assert cfg.pin.read("HSM PIN") == "env-pin"
    assert cfg.raft_password.read("Raft password") == "env-password"


def test_credential_sources(tmp_path, credentials):
    cfg = _full(tmp_path)
    assert cfg.pin.read("HSM PIN") == "1234-pin"
    assert cfg.raft_password.read("Raft password") == "raft secret value"


def test_secret_source_keeps_its_positional_fields():
    assert SecretSource("/etc/kmsd/pin") == SecretSource(file="/etc/kmsd/pin")
    assert SecretSource(None, "PIN") == SecretSource(env="PIN")


def test_the_secret_is_not_in_the_config_object(tmp_path, credentials):
    cfg = _full(tmp_path)
    assert "1234-pin" not in repr(cfg)
    assert "raft secret value" not in repr(cfg)


# -- secret errors ------------------------------------------------------------


def test_credential_without_credentials_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    cfg = _full(tmp_path)
    with pytest.raises(ConfigError) as caught:
        cfg.pin.read("HSM PIN")
    assert str(caught.value) == (
        "HSM PIN credential 'pin' cannot be read: CREDENTIALS_DIRECTORY is not set "
        "(run under systemd with LoadCredential=pin:<path>, or name a file instead)")
    with pytest.raises(ConfigError, match="LoadCredential=raft-password:<path>"):
        cfg.raft_password.read("Raft password")


def test_credential_with_empty_credentials_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "")
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        _full(tmp_path).pin.read("HSM PIN")


def test_credential_not_loaded_by_the_unit(tmp_path, credentials):
    (credentials / "pin").unlink()
    with pytest.raises(ConfigError) as caught:
        _full(tmp_path).pin.read("HSM PIN")
    assert str(caught.value) == (f"cannot read HSM PIN credential 'pin' at {credentials}/pin: "
                                 "No such file or directory")


def test_missing_file(tmp_path):
    cfg = _full(tmp_path, hsm_secret=f'pin_file = "{tmp_path}/absent"')
    with pytest.raises(ConfigError) as caught:
        cfg.pin.read("HSM PIN")
    assert str(caught.value) == (f"cannot read HSM PIN file {tmp_path}/absent: "
                                 "No such file or directory")


def test_unset_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("KMSD_TEST_UNSET", raising=False)
    cfg = _full(tmp_path, raft_secret='password_env = "KMSD_TEST_UNSET"')
    with pytest.raises(ConfigError) as caught:
        cfg.raft_password.read("Raft password")
    assert str(caught.value) == "Raft password environment variable KMSD_TEST_UNSET is not set"


@pytest.mark.parametrize("source", ["file", "env", "credential"])
def test_empty_secrets_are_refused(tmp_path, credentials, monkeypatch, source):
    # An empty Raft password would leave the pickle port unauthenticated.
    if source == "file":
        (tmp_path / "empty").write_text("\n")
        raft_secret = f'password_file = "{tmp_path}/empty"'
        expected = f"Raft password file {tmp_path}/empty is empty"
    elif source == "env":
        monkeypatch.setenv("KMSD_TEST_EMPTY", "  ")
        raft_secret = 'password_env = "KMSD_TEST_EMPTY"'
        expected = "Raft password environment variable KMSD_TEST_EMPTY is empty"
    else:
        (credentials / "raft-password").write_text("")
        raft_secret = 'password_credential = "raft-password"'
        expected = (f"Raft password credential 'raft-password' at "
                    f"{credentials}/raft-password is empty")
    cfg = _full(tmp_path, raft_secret=raft_secret)
    with pytest.raises(ConfigError) as caught:
        cfg.raft_password.read("Raft password")
    assert str(caught.value) == expected


def test_no_source_on_a_hand_made_secret_source():
    with pytest.raises(ConfigError, match="no source configured for the HSM PIN"):
        SecretSource().read("HSM PIN")


@pytest.mark.parametrize(("raft_secret", "hsm_secret", "expected"), [
    ("", 'pin_credential = "pin"',
     "raft needs one of password_file, password_env, password_credential"),
    ('password_credential = "raft-password"', "",
     "hsm needs one of pin_file, pin_env, pin_credential"),
    ('password_credential = "raft-password"', 'pin_file = "/p"\npin_env = "PIN"',
     "hsm: set only one of pin_file, pin_env, pin_credential (found pin_file, pin_env)"),
    ('password_file = "/p"\npassword_credential = "raft-password"', 'pin_credential = "pin"',
     "raft: set only one of password_file, password_env, password_credential "
     "(found password_file, password_credential)"),
    ('password_credential = "raft-password"', 'pin_credential = "../pin"',
     "hsm.pin_credential must be a credential name without '/', got '../pin'"),
    ('password_credential = ".."', 'pin_credential = "pin"',
     "raft.password_credential must be a credential name without '/', got '..'"),
    ('password_credential = "raft-password"', 'pin_credential = ""',
     "hsm.pin_credential must be a non-empty string"),
    ('password_file = 7', 'pin_credential = "pin"',
     "raft.password_file must be a non-empty string"),
])
def test_secret_options_are_checked_at_load(tmp_path, raft_secret, hsm_secret, expected):
    with pytest.raises(ConfigError) as caught:
        _full(tmp_path, raft_secret=raft_secret, hsm_secret=hsm_secret)
    assert str(caught.value) == expected


# -- other errors -------------------------------------------------------------


def test_unreadable_config(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config .*absent\.toml"):
        config.load(str(tmp_path / "absent.toml"))


def test_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config .*node\.toml: Expected"):
        config.load(_write(tmp_path, "[node\n"))


def test_missing_key_is_named(tmp_path):
    path = _write(tmp_path, MINIMAL.replace('token_label = "kmsd-node-1"\n', ""))
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value) == f"config {path} lacks token_label"


def test_missing_section_is_named(tmp_path):
    path = _write(tmp_path, MINIMAL.replace("[cluster]", "[clusters]"))
    with pytest.raises(ConfigError, match="lacks cluster"):
        config.load(path)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('regions = ["us-east-1"]', 'regions = ["US East"]',
     "cluster.regions must be region names, got ('US East',)"),
    ('regions = ["us-east-1"]', "regions = []", "cluster.regions must be region names, got ()"),
    ("account_id = 111122223333", 'account_id = "1234"', "cluster.account_id must be 12 digits"),
    ('listen = "127.0.0.1:7700"', 'listen = "127.0.0.1"',
     "api.listen must be host:port, got '127.0.0.1'"),
    ('admin_listen = "127.0.0.1:7800"', 'admin_listen = "127.0.0.1:http"',
     "api.admin_listen must be host:port, got '127.0.0.1:http'"),
    ('address = "127.0.0.1:7900"', 'address = "7900"',
     "raft.address must be host:port, got '7900'"),
])
def test_field_validation(tmp_path, old, new, expected):
    assert old in MINIMAL
    with pytest.raises(ConfigError) as caught:
        config.load(_write(tmp_path, MINIMAL.replace(old, new)))
    assert str(caught.value) == expected


def test_allow_host_oaep_decoding_is_off_unless_configured(tmp_path) -> None:
    from kmsd.config import parse

    raw = {
        "node": {"id": "n", "data_dir": str(tmp_path)},
        "api": {"listen": "127.0.0.1:1", "admin_listen": "127.0.0.1:2"},
        "raft": {"address": "127.0.0.1:3", "password_env": "X"},
        "cluster": {"regions": ["us-east-1"], "account_id": "111122223333"},
        "hsm": {"token_label": "t", "pin_env": "Y"},
    }
    assert parse(raw).allow_host_oaep_decoding is False
    raw["hsm"]["allow_host_oaep_decoding"] = True
    assert parse(raw).allow_host_oaep_decoding is True
