"""The one error type that means "the user's input is wrong" (exit code 2).

A TrainingFault is a run that cannot go on (exit code 1, one line). Everything else that
escapes is a bug in rigtrain (exit code 1, with a traceback).
"""


class UserError(Exception):
    """Bad input: a usage mistake, config, data or rig file. The message is one line that
    names the file or field and says what to do."""


class DataGone(UserError):
    """The training data cannot be read any more (a folder of videos deleted, a drive
    unplugged: data/ondemand.py); between_steps when the trainer knows the weights are a
    whole step's and the data position that step's end (mid-accumulation too: only the
    gradients had moved), so they can be saved."""

    def __init__(self, message: str, between_steps: bool = False):
        super().__init__(message)
        self.between_steps = between_steps


class TrainingFault(Exception):
    """A fault a run cannot go past that is not a bug: a full disk, weights that are no
    longer finite. The message is one line with what happened, what is saved and what to
    do; the process exits 1 without a traceback."""


class StoppedBySignal(KeyboardInterrupt):
    """A command that has nothing to save on a stop signal (`data prepare`: its journal is
    always up to date) stops on SIGTERM as on a Ctrl-C: one line, exit 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @classmethod
    def raise_it(cls, signum, frame) -> None:
        """A signal handler."""
        raise cls(signum)


def one_line(message: object) -> str:
    """The message as the one line the contract promises, whatever the user's input put in
    it (a key with a newline in it, quoted back): line breaks shown as \\n."""
    return str(message).strip().replace("\r", "\\r").replace("\n", "\\n")
