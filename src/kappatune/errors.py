"""The one exception type the CLI turns into a single clear line on stderr."""


class KappaTuneError(Exception):
    """A problem with the user's input or environment, stated in one line."""


class TrainingInterrupted(KappaTuneError):
    """Training stopped on request (Ctrl-C / SIGTERM) after saving a resumable checkpoint."""
