"""The README's Python section runs as shown: its python block, run from the repository root, prints the text
block that follows it."""

import re
import subprocess
import sys

from conftest import ROOT


def test_readme_python_block_prints_what_the_readme_shows():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    code, shown = re.search(r"```python\n(.*?)```\s*```text\n(.*?)```", section, re.S).groups()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown
