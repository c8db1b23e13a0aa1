"""Errors that name a user's mistake; the command line turns them into one line and exit status 2."""


class PyroVAEError(Exception):
    """Bad input: an unknown name, a wrong shape, a missing file, a run directory that is not one."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C); the message says what was kept and how to go on."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message as one line: a library's message may continue on more lines (torch's argument
    checks print the offending tensor on the next one); runs of white space are folded to one space."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first line of an error's message (a library's traceback-like text after it is dropped), at most
    ``limit`` characters: the part a one-line refusal quotes."""
    return (str(error).strip().splitlines() or [""])[0][:limit]
