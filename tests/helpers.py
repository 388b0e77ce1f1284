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
