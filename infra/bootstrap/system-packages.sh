#!/usr/bin/env bash
# Debian packages lambdalake needs on the machine itself: a Java 17+ runtime (Kafka, Spark),
# Maven (fetches the JVM jars and Strimzi's CRDs once), Go (fetches the Spark operator's and
# KubeRay's CRDs once, for `lambdalake k8s-check`), and Chromium with its WebDriver (the tests' headless
# check of the Airflow UI). Installs only what is missing; needs root or sudo.
set -euo pipefail

missing=()
java_ok() {
  local java="${JAVA_HOME:+$JAVA_HOME/bin/}java"
  command -v "$java" >/dev/null 2>&1 || return 1
  local major
  major=$("$java" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [ "${major:-0}" -ge 17 ]
}
java_ok || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v go >/dev/null 2>&1 || missing+=(golang-go)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
$sudo apt-get update -q
# RUNLEVEL=1: the packages' own services are not started (redis-server would take 6379,
# Ray's port); lambdalake runs what it needs on its own ports
$sudo env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
