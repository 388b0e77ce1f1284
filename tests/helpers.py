"""Small helpers the test files share."""


def override(config, **dotted):
    """Sets config fields named by dotted keys ('train.steps'=3) in place; returns config."""
    for key, value in dotted.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def event_scalars(files) -> dict:
    """{tag: {step: value}} of every scalar in TensorBoard event files (read in order: a resumed
    run adds a file, and the later file wins for a step logged twice)."""
    import struct
    from tensorboardX.proto import event_pb2
    out = {}
    for file in files:
        data = file.read_bytes()
        pos = 0
        while pos < len(data):  # TFRecord framing: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def import_benchmark(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    import importlib
    import os
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(folder)
