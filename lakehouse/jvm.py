"""The JVM as the core sees it: finding Java, where the jars lie and which ones Spark needs.

The jars live under `<state_dir>/jars` (`settings.jars_dir`), one folder per set:
`kafka` (the Apache Kafka broker), `spark` (Delta Lake and the Spark Kafka source) and,
only when asked for, `spark-s3` (Hadoop's S3A filesystem and the AWS SDK). Fetching them
is the platform's job (`infra.jvm.ensure_jars`, with Maven); this module only looks.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from lakehouse.errors import ServiceError

MIN_JAVA = 17
# the folders of `jars_dir` that hold each set of jars
KAFKA_JARS = "kafka"
SPARK_JARS = "spark"
SPARK_S3_JARS = "spark-s3"


@functools.cache
def java_binary() -> str:
    """Path of a Java >= 17 runtime (JAVA_HOME first, then PATH), probed once per process."""
    home = os.environ.get("JAVA_HOME")
    candidate = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not candidate or not Path(candidate).exists():
        raise ServiceError(
            f"Java {MIN_JAVA}+ is required for Kafka and Spark but was not found: install it "
            "(`apt-get install openjdk-17-jdk-headless`, or `make install`) or set JAVA_HOME"
        )
    probe = subprocess.run([candidate, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', probe.stderr)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise ServiceError(
            f"{candidate} is Java {major}; Kafka and Spark need Java {MIN_JAVA}+: "
            "install a newer JDK or point JAVA_HOME at one"
        )
    return candidate


def _artifact(jar: Path) -> str:
    """Artifact id of a jar file name: `kafka-clients-3.9.2.jar` -> `kafka-clients`."""
    return re.sub(r"-\d[^-]*(-[A-Za-z0-9.]+)?\.jar$", "", jar.name)


def spark_extra_jars(jars_dir: Path) -> list[Path]:
    """The extra jars for spark.jars, minus artifacts pyspark already ships (its versions win)."""
    import pyspark

    directory = jars_dir / SPARK_JARS
    jars = sorted([*directory.glob("*.jar"), *(jars_dir / SPARK_S3_JARS).glob("*.jar")])
    if not any(j.name.startswith("delta-spark") for j in jars):
        raise ServiceError(f"no Delta Lake jars in {directory}: run `make jars`")
    bundled = {_artifact(j) for j in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return [j for j in jars if _artifact(j) not in bundled]
