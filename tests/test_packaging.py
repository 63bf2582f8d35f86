"""The package as pip installs it: every subpackage of gptlora/ is listed in pyproject.toml.

setuptools installs only the packages pyproject.toml names; a subpackage left out imports in the
checkout (the tests run there) but is missing from the wheel a user installs.
"""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_in_the_wheel_s_package_list():
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    listed = set(re.findall(r'"(gptlora(?:\.\w+)*)"', re.search(r"packages\s*=\s*\[([^\]]*)\]", text).group(1)))
    on_disk = {".".join(init.parent.relative_to(REPO_ROOT).parts) for init in (REPO_ROOT / "gptlora").rglob("__init__.py")}
    assert listed == on_disk, f"pyproject.toml lists {sorted(listed)}; gptlora/ holds {sorted(on_disk)}"


def test_the_script_and_python_m_name_the_same_main():
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'gptlora = "gptlora.cli.app:main"' in text
    assert "from .app import main" in (REPO_ROOT / "gptlora" / "cli" / "__main__.py").read_text(encoding="utf-8")
