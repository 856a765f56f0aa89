"""The Spark session of lambdalake: Delta Lake and the Kafka source on `spark.jars`.

The jars come from `<state_dir>/jars/spark` (fetched by Maven, see infra/jvm.py; found by
lakehouse/jvm.py), so a session never resolves packages with Ivy at run time. One session
per process: building it costs ~10 s, so callers share the session `spark_session` returns.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lakehouse.config import Settings
from lakehouse.jvm import java_binary, spark_extra_jars

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def spark_session(settings: Settings, *, app_name: str = "lambdalake") -> SparkSession:
    from pyspark.sql import SparkSession

    java_binary()  # fail early with a message that says how to install Java
    # local mode starts Python workers from the driver's environment, not from spark.* confs
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode talks to loopback only
    jars = ",".join(str(jar) for jar in spark_extra_jars(settings.jars_dir))
    warehouse = settings.state_path / "spark-warehouse"
    builder = (
        SparkSession.builder.appName(app_name)
        .master(settings.spark_master)
        .config("spark.jars", jars)
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.driver.memory", settings.spark_driver_memory)
        .config("spark.sql.shuffle.partitions", str(settings.spark_shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.warehouse.dir", str(warehouse))
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        # Python workers run this environment's interpreter (pyarrow, the spec, ...)
        .config("spark.pyspark.python", sys.executable)
        .config("spark.executorEnv.PYSPARK_PYTHON", sys.executable)
        .config("spark.databricks.delta.snapshotPartitions", "2")
        .config("spark.sql.adaptive.enabled", "true")
    )
    if settings.train_use_gpu:
        # TorchDistributor takes its GPUs from Spark's resource scheduling: the driver's in
        # local mode; on a cluster one per barrier task (executors' GPUs are cluster config)
        if settings.spark_master.startswith("local"):
            discovery = Path(__file__).resolve().parent.parent / "infra" / "bin" / "gpu-discovery.sh"
            builder = (
                builder.config("spark.driver.resource.gpu.amount", str(settings.train_num_processes))
                .config("spark.driver.resource.gpu.discoveryScript", str(discovery))
            )
        else:
            builder = builder.config("spark.task.resource.gpu.amount", "1")
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session
