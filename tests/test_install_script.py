"""scripts/uv_install.py: uv installs from the indexes, wheel folders and constraints pip is
configured with (config files and PIP_* variables), so both installers pick the same packages."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("uv_install",
                                              os.path.join(ROOT, "scripts", "uv_install.py"))
uv_install = importlib.util.module_from_spec(spec)
spec.loader.exec_module(uv_install)


def flag_values(cmd, flag):
    return [cmd[i + 1] for i, arg in enumerate(cmd) if arg == flag]


def test_pip_settings_become_uv_flags_with_pip_precedence(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.example/simple\n"
                    "extra-index-url = https://file.example/simple\n"
                    "constraint = /c/constraints.txt\n"
                    "[install]\nfind-links = /from/install/section\n")
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    # the environment overrides the file, as in pip; two values separated by a space
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "https://b.example/simple https://c.example/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_CERT", "/certs/ca.pem")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    settings = uv_install.pip_settings()
    cmd, env = uv_install.uv_command(settings, ["-e", ".[video]"])
    assert flag_values(cmd, "--index-url") == ["https://mirror.example/simple"]
    assert flag_values(cmd, "--extra-index-url") == ["https://b.example/simple",
                                                     "https://c.example/simple"]
    assert flag_values(cmd, "--find-links") == ["/from/install/section"]
    assert flag_values(cmd, "--constraint") == ["/c/constraints.txt"]
    assert flag_values(cmd, "--index-strategy") == ["unsafe-best-match"]  # pip's: best of all
    assert "--no-cache" in cmd
    assert flag_values(cmd, "--python") == [cmd[0]]  # this interpreter's environment
    assert cmd[-2:] == ["-e", ".[video]"]
    assert env["SSL_CERT_FILE"] == "/certs/ca.pem"  # pip's CA bundle, for uv too


def test_no_pip_settings_no_index_flags():
    cmd, _ = uv_install.uv_command({}, ["x"])
    for flag in ("--index-url", "--extra-index-url", "--find-links", "--constraint", "--no-cache"):
        assert flag not in cmd
