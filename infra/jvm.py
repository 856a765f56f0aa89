"""The JVM side of the platform: the jars Maven fetches into `<state_dir>/jars`, and the
Kafka broker's classpath. Finding Java and Spark's jars is the core's (`lakehouse.jvm`).

Maven projects under `infra/jvm/` declare what is needed: `kafka-broker` (the Apache
Kafka broker, KRaft, with its runtime classpath), `spark-extras` (Delta Lake and the Spark
Kafka source for the pinned pyspark) and, only when asked for, `s3-extras` (Hadoop's S3A
filesystem and the AWS SDK, for a Delta lake on S3). `ensure_jars` copies them into the
state dir, once per pom content; Spark sessions receive the extras through `spark.jars`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from lakehouse.errors import ServiceError
from lakehouse.jvm import KAFKA_JARS, SPARK_JARS, SPARK_S3_JARS

JVM_PROJECTS = Path(__file__).resolve().parent / "jvm"


def _pom_digest(project: str) -> str:
    return hashlib.sha256((JVM_PROJECTS / project / "pom.xml").read_bytes()).hexdigest()[:16]


def ensure_jars(jars_dir: Path, *, quiet: bool = True, s3: bool = False) -> None:
    """Fetch the Kafka broker and Spark extra jars (and the S3A ones if `s3`) with Maven
    unless already present."""
    projects = [("kafka-broker", KAFKA_JARS), ("spark-extras", SPARK_JARS)]
    if s3:
        projects.append(("s3-extras", SPARK_S3_JARS))
    for project, target in projects:
        destination = jars_dir / target
        marker = destination / f".pom-{_pom_digest(project)}"
        if marker.exists():
            continue
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError(
                "Maven (mvn) is needed once to fetch the Kafka and Spark jars: "
                "install it (`apt-get install maven`, or `make install`)"
            )
        if destination.exists():
            shutil.rmtree(destination)
        destination.mkdir(parents=True)
        command = [mvn, "-B", "package", f"-Djars.dir={destination}"]
        if quiet:
            command.insert(1, "-q")
        result = subprocess.run(command, cwd=JVM_PROJECTS / project, capture_output=quiet, text=True)
        if result.returncode != 0:
            detail = ((result.stdout or "") + (result.stderr or ""))[-2000:] if quiet else ""
            raise ServiceError(f"Maven could not fetch the {target} jars:\n{detail}")
        marker.touch()


def kafka_classpath(jars_dir: Path) -> str:
    directory = jars_dir / KAFKA_JARS
    if not any(directory.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no Kafka broker jars in {directory}: run `make jars`")
    return f"{directory}/*"
