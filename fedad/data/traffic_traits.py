"""The synthetic generator's traffic model: device and attack-family traits, services, noise."""

# The trait tables keep one row per device or attack family, wider than the line limit.
# ruff: noqa: E501

from __future__ import annotations

import numpy as np

DEVICES = ("camera", "thermostat", "smart_plug", "doorbell", "hub", "smart_speaker", "sensor")
FAMILIES = ("ddos", "port_scan", "botnet_c2", "brute_force", "exfiltration")
SERVICES = ("http", "https", "dns", "mqtt", "coap", "ssh", "telnet", "rtsp", "ntp", "other")
# Transport of each service; "other" is drawn from OTHER_PROTOCOLS.
SERVICE_PROTOCOL = np.array(["tcp", "tcp", "udp", "mqtt", "coap", "tcp", "tcp", "tcp", "udp", ""])
OTHER_PROTOCOLS, OTHER_P = np.array(["icmp", "tcp", "udp"]), np.array([0.5, 0.3, 0.2])

# Latent traits of a flow in natural units: packets and payload bytes per direction, duration (s),
# inter-arrival and payload coefficients of variation, TCP window, distinct ports and hosts and
# connections/s of the source in its window, ttl, then per-packet TCP flag probabilities
# (syn ack fin rst psh urg). The first N_LOG traits mix and vary on a log scale (heavy tails).
N_LOG = 11
NOISE = np.array([0.5, 0.5, 0.3, 0.3, 0.7, 0.3, 0.3, 0.2, 0.3, 0.3, 0.5, 2.0] + [0.04] * 6)
# fmt: off
DEVICE_TRAITS = np.array(
    [
        # fwd  bwd  fpay  bpay  dur  iat  pcv    win  prt  ip  conn  ttl   syn   ack   fin    rst  psh  urg
        [400, 100, 1100,   60,  30, 0.5, 0.3, 29200,   1,  1,  0.5,  64, 0.01, 0.95, 0.01, 0.002, 0.3,   0],  # camera
        [  6,   5,   80,   60, 0.5, 0.2, 0.2, 14600,   1,  1,  0.2,  64, 0.15,  0.8,  0.1,  0.01, 0.4,   0],  # thermostat
        [  8,   6,  120,   90,   1, 0.3, 0.2, 14600,   1,  1,  0.3,  64, 0.12,  0.8,  0.1,  0.01, 0.4,   0],  # smart_plug
        [150,  40,  700,   80,  10, 0.6, 0.4, 29200,   1,  1,  0.5,  64, 0.02,  0.9, 0.02, 0.005, 0.3,   0],  # doorbell
        [ 40,  40,  300,  300,   5, 0.8, 0.6, 64240,   3,  3,    5,  64, 0.05,  0.9, 0.04,  0.01, 0.4,   0],  # hub
        [ 60, 300,  200,  900,  20, 0.5, 0.4, 29200,   1,  2,    1,  64, 0.02, 0.95, 0.01, 0.005, 0.3,   0],  # speaker
        [  3,   2,   40,   20, 0.1, 0.2, 0.2,  5840,   1,  1,  0.2,  64,  0.3,  0.6,  0.2,  0.02, 0.3,   0],  # sensor
    ]
)
FAMILY_TRAITS = np.array(
    [
        #  fwd  bwd  fpay  bpay   dur   iat   pcv    win  prt  ip  conn  ttl   syn   ack   fin    rst  psh   urg
        [1100,   2,   20,   10,    5,  0.1, 0.05,  1024,   1,  1,  200,  50,  0.9, 0.05,    0,  0.05,   0, 0.02],  # ddos
        [   2,   1,    5,    5, 0.01,  0.1, 0.05,  1024, 100, 20,   80,  52,  0.9,  0.1, 0.05,   0.6,   0, 0.01],  # port_scan
        [  10,  10,   90,  110,   60, 0.05,  0.1,  8192,   1,  1,  0.5,  48, 0.05,  0.9, 0.05,  0.02, 0.5,    0],  # botnet_c2
        [  15,  12,   60,   70,    2,  0.3,  0.2, 14600,   1,  1,   30,  50,  0.1,  0.8,  0.1,  0.15, 0.5,    0],  # brute_force
        [ 800,  20, 1300,   50,   90,  1.0, 0.15, 64240,   1,  1,    1,  64, 0.01, 0.95, 0.01, 0.005, 0.4,    0],  # exfil
    ]
)
# fmt: on
SERVICE_MIX = np.array(
    [
        # http https dns mqtt coap ssh telnet rtsp ntp other
        [0.10, 0.25, 0.10, 0, 0, 0, 0, 0.45, 0.05, 0.05],  # camera
        [0, 0.30, 0.10, 0.50, 0, 0, 0, 0, 0.10, 0],  # thermostat
        [0.10, 0.20, 0.15, 0.40, 0.10, 0, 0, 0, 0.05, 0],  # smart_plug
        [0.10, 0.45, 0.15, 0, 0, 0, 0, 0.25, 0.05, 0],  # doorbell
        [0.10, 0.25, 0.10, 0.25, 0.15, 0.05, 0, 0, 0.05, 0.05],  # hub
        [0.10, 0.60, 0.20, 0, 0, 0, 0, 0, 0.05, 0.05],  # smart_speaker
        [0, 0, 0.10, 0.30, 0.50, 0, 0, 0, 0.05, 0.05],  # sensor
        [0.35, 0.15, 0.20, 0, 0, 0, 0, 0, 0.10, 0.20],  # ddos
        [0.10, 0.10, 0, 0.05, 0, 0.10, 0.15, 0.10, 0, 0.40],  # port_scan
        [0.20, 0.30, 0.15, 0.20, 0, 0, 0, 0, 0, 0.15],  # botnet_c2
        [0.15, 0, 0, 0.05, 0, 0.40, 0.40, 0, 0, 0],  # brute_force
        [0.10, 0.50, 0.30, 0, 0, 0, 0, 0, 0, 0.10],  # exfiltration
    ]
)
# Which devices each family tends to hit (row 0: normal traffic, no preference). Attackers favour
# devices exposing telnet/ssh/rtsp; exfiltration needs something worth stealing.
AFFINITY = np.array(
    [
        # cam therm plug bell hub spk sensor
        [1, 1, 1, 1, 1, 1, 1],  # normal
        [2, 1, 2, 2, 1, 1, 1],  # ddos (compromised bots flood out)
        [1, 1, 1, 1, 2, 1, 1],  # port_scan
        [3, 1, 1, 2, 1, 1, 0.5],  # botnet_c2
        [3, 0.5, 0.5, 2, 2, 0.5, 0.5],  # brute_force
        [3, 0.5, 0.5, 2, 2, 2, 0.5],  # exfiltration
    ]
)
MTU_PAYLOAD = 1460.0


def to_latent(traits: np.ndarray) -> np.ndarray:
    """Traits in natural units to the latent space: the first ``N_LOG`` on a log scale."""
    latent = traits.astype(float)
    latent[:, :N_LOG] = np.log(latent[:, :N_LOG])
    return latent


DEVICE_LATENT, FAMILY_LATENT = to_latent(DEVICE_TRAITS), to_latent(FAMILY_TRAITS)
DEVICE_SERVICES, FAMILY_SERVICES = SERVICE_MIX[: len(DEVICES)], SERVICE_MIX[len(DEVICES) :]
