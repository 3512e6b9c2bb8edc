"""``python -m cloud --bundle DIR --listen HOST:PORT``: serve the cloud tier."""
from common.cli import run
from common.tier_main import main

if __name__ == "__main__":
    run(lambda argv: main("cloud", argv))
