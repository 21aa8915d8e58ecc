import pytest

from ipserve.app import AppError, load


def make(tmp_path, name, text):
    (tmp_path / name).write_text(text)


def test_module_and_file_forms(tmp_path):
    make(tmp_path, "mod_a.py", "def application(e, s): return []\nfactory = lambda: application\n")
    assert load("mod_a:application", str(tmp_path)).__name__ == "application"
    assert load("mod_a", str(tmp_path)).__name__ == "application"
    assert load("mod_a:factory()", str(tmp_path)).__name__ == "application"
    assert callable(load(str(tmp_path / "mod_a.py") + ":application"))


@pytest.mark.parametrize("body, spec, words", [
    (None, "nowhere_mod:app", ["nowhere_mod", "no module named"]),
    ("x = 1\n", "mod_b:app", ["has no attribute 'app'"]),
    ("app = 3\n", "mod_c:app", ["not callable"]),
    ("def app(:\n", "mod_d:app", ["mod_d.py, line 1"]),
    ("raise RuntimeError('boom')\n", "mod_e:app", ["RuntimeError: boom", "mod_e.py, line 1"]),
    (None, "missing.py:app", ["does not exist"]),
    (None, ":app", ["not of the form"]),
])
def test_errors_are_one_line_naming_app(tmp_path, body, spec, words):
    if body is not None:
        make(tmp_path, spec.split(":")[0] + ".py", body)
    with pytest.raises(AppError) as err:
        load(spec, str(tmp_path))
    message = str(err.value)
    assert spec in message and "\n" not in message
    for word in words:
        assert word in message
