"""``python -m edge --bundle DIR --listen HOST:PORT --next HOST:PORT``: serve the edge tier."""
from common.cli import run
from common.tier_main import main

if __name__ == "__main__":
    run(lambda argv: main("edge", argv))
