"""Exceptions and warnings of qscope-plugin.

Every error says three things: the bad value, what is valid, and what to do. Subclasses also inherit the
built-in exception that SAELens or the standard library would raise in the same situation, so existing
``except ValueError`` / ``except FileNotFoundError`` clauses keep working.
"""

from __future__ import annotations


class QScopeError(Exception):
    """Base class of every error raised by qscope-plugin."""


class UnknownReleaseError(QScopeError, ValueError):
    """A release name that is not in the catalogue."""


class IndexSpecError(QScopeError, ValueError):
    """An index list, range or count that cannot be used: unreadable, reversed, or past what it indexes
    (``qscope_plugin.indices`` reads every one of them)."""


class IndexOutOfRangeError(IndexSpecError):
    """An index outside ``0 .. size - 1`` of what it indexes (a prompt's positions, a model's layers, an SAE's
    features)."""


class LayerOutOfRangeError(IndexOutOfRangeError):
    """A layer index outside ``0 .. n_layers - 1`` of a release, an SAE folder or a model."""


class SAEInputError(QScopeError, ValueError):
    """An activation tensor or feature id that does not fit the SAE."""


class FeatureOutOfRangeError(SAEInputError, IndexOutOfRangeError):
    """A feature index outside ``0 .. d_sae - 1`` of an SAE."""


def layer_out_of_range(layer: object, n_layers: int, subject: str) -> LayerOutOfRangeError:
    """The one message for a bad layer, wherever it is caught (``indices.out_of_range``'s shape)."""
    from qscope_plugin.indices import out_of_range

    return out_of_range("layer", layer, n_layers, subject)


def feature_out_of_range(feature: object, d_sae: int, subject: str = "this SAE") -> FeatureOutOfRangeError:
    """The one message for a bad feature index, wherever it is caught (``indices.out_of_range``'s shape)."""
    from qscope_plugin.indices import out_of_range

    return out_of_range("feature", feature, d_sae, subject)


class ContextLengthError(QScopeError, ValueError):
    """A prompt plus new tokens longer than the model's context, refused before anything is generated."""


class MalformedFileError(QScopeError, ValueError):
    """A file another program wrote (lm-eval outputs, a dataset, saved footprints, classifier JSON) that cannot be
    read as what it should be: the message names the file and what is wrong with it."""


def malformed_file(path: object, problem: str, expected: str) -> MalformedFileError:
    """The one message for a malformed file: which file, what is wrong with it, what it should be."""
    return MalformedFileError(f"{str(path)!r} {problem}; expected {expected}")


class SAEFileError(QScopeError, ValueError):
    """A ``layer{n}.sae.pt`` file that is unreadable, unsafe or not in the Qwen-Scope format."""


class ChecksumMismatchError(SAEFileError):
    """An SAE file whose SHA-256 differs from the one recorded for it (its LFS blob name, or ``SHA256SUMS``):
    a flipped byte in the float data loads as finite, wrong weights that no structural check can see."""


class IntegrityError(QScopeError, OSError):
    """``qscope verify`` found corrupted files: the disk or a transfer changed them (a runtime failure)."""


class NotCachedError(QScopeError, FileNotFoundError):
    """An SAE file that is not in the local cache while the hub is unreachable or offline."""


class HubError(QScopeError, OSError):
    """The hub refused or failed a download: unknown repo, revision or file, an HTTP error, or no network."""


class HubRepoNotFoundError(HubError):
    """The repository does not exist on the hub, or is private or gated for the current token."""


class HubRevisionNotFoundError(HubError):
    """The requested branch, tag or commit does not exist in the repository."""


class HubFileNotFoundError(HubError, FileNotFoundError):
    """The repository has no such file at the requested revision."""


class HubUnreachableError(HubError, ConnectionError):
    """The hub could not be reached (connection refused, DNS failure, timeout, interrupted transfer)."""


class QScopeWarning(UserWarning):
    """Data issues the user should know about but that do not stop the work (e.g. a mismatched backbone)."""
