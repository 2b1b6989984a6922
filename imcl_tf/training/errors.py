"""How a bad training option is reported: a ValueError that names the flag."""


def bad_flag(flag: str, message: str) -> None:
    raise ValueError(f"--{flag}: {message}")
