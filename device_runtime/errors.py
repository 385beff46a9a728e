"""fedkit's error hierarchy. Every message says what happened and what to do about it.

    FedkitError                 anything fedkit raises on purpose
    ├── BundleError             a bundle is missing, corrupt, or of an unknown schema
    ├── CodecError              an update or tensor payload cannot be decoded or is invalid
    ├── EngineError             a training engine cannot load or run a bundle
    ├── CheckpointError         a local checkpoint cannot be read
    ├── ProtocolError           the aggregator answered something the client cannot use
    │   └── RestartRound        the SplitFed edge lost the phone's round: train it again from batch 0
    ├── DataError               a dataset file or a phone's data shard is missing or corrupt
    ├── DeployError             a phone cannot be deployed, or did not verify on the target
    │   └── EmulationError      (android_harness.arm64) the emulated arm64 phone cannot be built or run
    ├── NetnsError              (android_harness.netns) network namespaces or tc cannot be set up
    ├── ExportError             (exporters.errors) a part of the model cannot be exported for an engine
    ├── ModelError              (toolkit.errors) an unknown model, missing or wrong weights, a bad cut
    ├── PlanError               (toolkit.errors) a plan or profile is invalid, or no choice fits a phone
    ├── ConfigError             (toolkit.errors) a run configuration is invalid
    ├── StoreError              (toolkit.errors) the aggregator's database cannot be opened or is inconsistent
    └── SimulationError         (toolkit.errors) a simulated run could not be set up or did not finish

This docstring is the whole tree: every fedkit error is one of these (tests/test_layers.py checks it).

InternalError is different: a broken assumption inside fedkit, not a user mistake.
"""


class FedkitError(Exception):
    """Base of every error fedkit raises for a user to act on."""


class BundleError(FedkitError):
    """A bundle cannot be used: a file is missing, altered or truncated, or the manifest is bad."""


class CodecError(FedkitError):
    """An encoded update or tensor cannot be decoded, or decodes to something invalid."""


class EngineError(FedkitError):
    """A training engine cannot load or run the bundle it was given."""


class CheckpointError(FedkitError):
    """A local trainer checkpoint cannot be read back."""


class ProtocolError(FedkitError):
    """The aggregator's answer breaks the sync protocol, or it refused a request for good."""


class RestartRound(ProtocolError):
    """The SplitFed edge holds no state for the phone's round (the aggregator restarted): the
    phone must train the round again from batch 0, from the round's base weights."""


class DataError(FedkitError):
    """A dataset file or a phone's data shard is missing, truncated or corrupt."""


class DeployError(FedkitError):
    """A phone cannot be deployed (bad bundle, shard or credential), or did not verify on the target."""


class InternalError(Exception):
    """A broken assumption inside fedkit: please report it with the traceback."""
