"""The platform's Kafka: a single-node Apache Kafka broker (KRaft) run from the jars Maven
fetched (`infra.jvm`), formatted on first start, healthy once it lists its topics.

(`import kafka` below is the kafka-python client: imports are absolute.)
"""

from __future__ import annotations

import base64
import subprocess
import uuid

from infra.jvm import kafka_classpath
from infra.process import ManagedProcess, port_open
from infra.service import LOCALHOST, Service
from lakehouse.errors import ServiceError
from lakehouse.jvm import java_binary
from lakehouse.streams import kafka_client_config


class KafkaService(Service):
    """A single-node Apache Kafka broker (KRaft: broker and controller in one JVM)."""

    name = "kafka"
    wave = 0

    @property
    def controller_port(self) -> int:
        return self.settings.kafka_port + 1

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.settings.kafka_port, self.controller_port)

    @property
    def url(self) -> str:
        return f"kafka://{LOCALHOST}:{self.settings.kafka_port}"

    def processes(self) -> list[ManagedProcess]:
        java = [
            java_binary(),
            f"-Xmx{self.settings.kafka_heap}",
            f"-Xms{self.settings.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            kafka_classpath(self.settings.jars_dir),
        ]
        return [self.process("kafka", [*java, "kafka.Kafka", str(self.home / "server.properties")])]

    def prepare(self) -> None:
        super().prepare()
        port, controller = self.settings.kafka_port, self.controller_port
        data = self.home / "data"
        (self.home / "server.properties").write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@{LOCALHOST}:{controller}",
                    f"listeners=PLAINTEXT://{LOCALHOST}:{port},CONTROLLER://{LOCALHOST}:{controller}",
                    f"advertised.listeners=PLAINTEXT://{LOCALHOST}:{port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={data}",
                    f"num.partitions={self.settings.kafka_partitions}",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    # topics are created deliberately (lambdalake topics), never by a typo
                    "auto.create.topics.enable=false",
                    # the platform keeps history in bronze; Kafka keeps a week as a buffer
                    "log.retention.hours=168",
                    "num.network.threads=2",
                    "num.io.threads=4",
                    "",
                ]
            )
        )
        (self.home / "log4j2.properties").write_text(
            "\n".join(
                [
                    "status = warn",
                    "appender.out.type = Console",
                    "appender.out.name = OUT",
                    "appender.out.layout.type = PatternLayout",
                    "appender.out.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = WARN",
                    "rootLogger.appenderRef.out.ref = OUT",
                    "logger.server.name = kafka.server.KafkaRaftServer",
                    "logger.server.level = INFO",
                    "",
                ]
            )
        )
        if not (data / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            result = subprocess.run(
                [
                    java_binary(),
                    "-Xmx256m",
                    f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
                    "-cp",
                    kafka_classpath(self.settings.jars_dir),
                    "kafka.tools.StorageTool",
                    "format",
                    # one token: a random id may start with "-", which would read as an option
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(self.home / "server.properties"),
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise ServiceError(f"kafka: formatting {data} failed:\n{result.stdout}{result.stderr}")

    def ready(self) -> bool:
        if not port_open(LOCALHOST, self.settings.kafka_port):
            return False
        from kafka import KafkaAdminClient  # kafka-python, not this module
        from kafka.errors import KafkaError

        try:
            admin = KafkaAdminClient(  # the broker this platform started, whatever else is listed
                **{**kafka_client_config(self.settings),
                   "bootstrap_servers": [f"{LOCALHOST}:{self.settings.kafka_port}"]},
                request_timeout_ms=3000,
                client_id="lambdalake-health",
            )
        except (KafkaError, OSError):
            return False
        try:
            admin.list_topics()
            return True
        except (KafkaError, OSError):
            return False
        finally:
            admin.close()
