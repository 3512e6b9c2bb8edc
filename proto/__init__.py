"""Generated wire contract (see splitexit.proto); regenerate with ``python -m scripts.gen_proto``."""
