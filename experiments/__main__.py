# The front end imports torch and Lightning only after the config is composed and checked (experiments/cli.py).
from experiments.cli import main

main()
