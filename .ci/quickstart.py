"""Print the README's quick-start commands, one per line: the lines of the first ```bash block
under the "## Quick start" heading. .ci/run runs exactly these, so the README cannot drift from CI."""
import re
import sys

text = open(sys.argv[1], encoding="utf-8").read()
section = text.split("## Quick start", 1)[1]
block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
for line in block.splitlines():
    if line.strip() and not line.lstrip().startswith("#"):
        print(line.strip())
