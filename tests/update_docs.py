"""Regenerate the README's spec reference from the schema: python tests/update_readme.py"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.spec import reference_markdown  # noqa: E402

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
from serving.spec import ServeSpec  # noqa: E402

new = re.sub(r"(<!-- spec-reference:start -->\n).*?(<!-- spec-reference:end -->)",
             lambda m: m.group(1) + reference_markdown() + "\n" + m.group(2), text, flags=re.S)
new = re.sub(r"(<!-- serving-reference:start -->\n).*?(<!-- serving-reference:end -->)",
             lambda m: m.group(1) + reference_markdown(ServeSpec) + "\n" + m.group(2), new, flags=re.S)
readme.write_text(new)
print("updated" if new != text else "unchanged")
