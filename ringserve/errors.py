"""The project's one exception hierarchy; entry points map it to exit codes or HTTP statuses."""


class RingserveError(Exception):
    """Base of every error the project raises on purpose."""

    exit_code = 1


class ConfigError(RingserveError):
    """A setting in `.env` or the environment is missing or invalid."""

    exit_code = 2


class LaunchError(RingserveError):
    """Starting, stopping or supervising the ranks failed."""

    exit_code = 3


class RemoteHostError(LaunchError):
    """A remote host could not be reached, authenticated or prepared."""


class ProtocolError(RingserveError):
    """A frame on the socket or a broadcast between ranks was malformed."""


class GenerationError(RingserveError):
    """A request could not be served; carries the HTTP status the API should answer."""

    def __init__(
        self,
        message: str,
        status: int = 500,
        code: str = "generation_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param  # the request field at fault, when one is


class MemoryCheckError(LaunchError):
    """A host has less free memory than its share of the model's weights needs, or less disk
    than the download needs."""

    exit_code = 6


class ModelError(RingserveError):
    """The configured model cannot be served as it is: not a model directory, no tokenizer or
    weights, an architecture mlx-lm does not know, heads that do not divide the ranks."""

    exit_code = 4


class ModelUnavailableError(ModelError):
    """The model cannot be obtained: not cached while offline, the hub unreachable, a repo or
    revision that does not exist, a token missing."""

    exit_code = 5


class MlxUnavailableError(LaunchError):
    """MLX cannot be imported on this host (for instance a CUDA build without an NVIDIA driver)."""
