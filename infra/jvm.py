"""The JVM side: finding Java, and the jars Maven fetches into `<state_dir>/jars`.

Maven projects under `infra/jvm/` declare what is needed: `kafka-broker` (the Apache
Kafka broker, KRaft, with its runtime classpath), `spark-extras` (Delta Lake and the Spark
Kafka source for the pinned pyspark) and, only when asked for, `s3-extras` (Hadoop's S3A
filesystem and the AWS SDK, for a Delta lake on S3). `ensure_jars` copies them into the
state dir, once per pom content; Spark sessions receive the extras through `spark.jars`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from lakehouse.errors import ServiceError

JVM_PROJECTS = Path(__file__).resolve().parent / "jvm"
MIN_JAVA = 17


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


def _pom_digest(project: str) -> str:
    return hashlib.sha256((JVM_PROJECTS / project / "pom.xml").read_bytes()).hexdigest()[:16]


def ensure_jars(jars_dir: Path, *, quiet: bool = True, s3: bool = False) -> None:
    """Fetch the Kafka broker and Spark extra jars (and the S3A ones if `s3`) with Maven
    unless already present."""
    projects = [("kafka-broker", "kafka"), ("spark-extras", "spark")]
    if s3:
        projects.append(("s3-extras", "spark-s3"))
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
    directory = jars_dir / "kafka"
    if not any(directory.glob("kafka_2.13-*.jar")):
        raise ServiceError(f"no Kafka broker jars in {directory}: run `make jars`")
    return f"{directory}/*"


def _artifact(jar: Path) -> str:
    """Artifact id of a jar file name: `kafka-clients-3.9.2.jar` -> `kafka-clients`."""
    return re.sub(r"-\d[^-]*(-[A-Za-z0-9.]+)?\.jar$", "", jar.name)


def spark_extra_jars(jars_dir: Path) -> list[Path]:
    """The extra jars for spark.jars, minus artifacts pyspark already ships (its versions win)."""
    import pyspark

    directory = jars_dir / "spark"
    jars = sorted([*directory.glob("*.jar"), *(jars_dir / "spark-s3").glob("*.jar")])
    if not any(j.name.startswith("delta-spark") for j in jars):
        raise ServiceError(f"no Delta Lake jars in {directory}: run `make jars`")
    bundled = {_artifact(j) for j in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return [j for j in jars if _artifact(j) not in bundled]
