"""Plugin discovery (placeholder until the core lands; replaced in this session)."""


def load_plugins() -> None:
    return None
