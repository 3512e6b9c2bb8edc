"""``python -m edge --bundle DIR --listen HOST:PORT --next TARGET``: serve the edge tier (``splitexit-edge``)."""
from common.cli import run
from common.serving import host


def main(argv: list[str] | None = None) -> int:
    host.tune_environment()  # before torch loads its OpenMP runtime and allocator
    from common.serving.tier import main as serve_tier

    return serve_tier("edge", argv)


def cli() -> None:
    run(main)


if __name__ == "__main__":
    cli()
