"""Write README.md from nbs/index.ipynb (a stand-in for `nbdev_readme`, which needs Quarto).
Markdown cells are copied, visible code cells become ```python blocks; `#| hide` cells are left out."""
import json, sys
from pathlib import Path

def readme_text(nb_path='nbs/index.ipynb'):
    nb = json.loads(Path(nb_path).read_text())
    out = []
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide'): continue
        out.append(src if c['cell_type'] == 'markdown' else f"```python\n{src}\n```")
    return '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    root = Path(__file__).resolve().parent.parent
    text = readme_text(root/'nbs'/'index.ipynb')
    if '--check' in sys.argv:
        sys.exit(0 if (root/'README.md').read_text() == text else 'README.md is out of step with nbs/index.ipynb: run python tools/make_readme.py')
    (root/'README.md').write_text(text)
