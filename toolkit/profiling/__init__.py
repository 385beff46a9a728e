"""Device profiles: measured on this host (`local`), on a phone over adb (`adb`), in the emulated
arm64 phone (`arm64-emulated`), or taken from the shipped catalogue of phone classes (`catalog`)."""

from toolkit.profiling.adb import probe_adb
from toolkit.profiling.arm64 import probe_arm64
from toolkit.profiling.catalog import catalog_profiles, class_names, link, links
from toolkit.profiling.local import measure_local
from toolkit.profiling.profile import SCHEMA_VERSION, BlockTiming, DeviceProfile, Link, load_profiles

__all__ = [
    "SCHEMA_VERSION",
    "BlockTiming",
    "DeviceProfile",
    "Link",
    "catalog_profiles",
    "class_names",
    "link",
    "links",
    "load_profiles",
    "measure_local",
    "probe_adb",
    "probe_arm64",
]
