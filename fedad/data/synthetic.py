"""Built-in synthetic IoT site traffic: offline, deterministic, naturally non-IID across sites."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard, cast

import numpy as np
import pandas as pd

from fedad.data.traffic_traits import (
    AFFINITY,
    DEVICE_LATENT,
    DEVICE_SERVICES,
    DEVICES,
    FAMILIES,
    FAMILY_LATENT,
    FAMILY_SERVICES,
    MTU_PAYLOAD,
    N_LOG,
    NOISE,
    OTHER_P,
    OTHER_PROTOCOLS,
    SERVICE_PROTOCOL,
    SERVICES,
)
from fedad.errors import FedadError

# The CICIoT2023 profile: its 33 attack labels, largest class first, each drawn as one of the
# families above, hitting one service more than the family does, with a trait offset of its own.
CICIOT_NORMAL = "BenignTraffic"
_CICIOT_CLASSES = (
    ("DDoS-ICMP_Flood", "ddos", "other"),
    ("DDoS-UDP_Flood", "ddos", "dns"),
    ("DDoS-TCP_Flood", "ddos", "http"),
    ("DDoS-PSHACK_Flood", "ddos", "https"),
    ("DDoS-SYN_Flood", "ddos", "http"),
    ("DDoS-RSTFINFlood", "ddos", "https"),
    ("DDoS-SynonymousIP_Flood", "ddos", "http"),
    ("DoS-UDP_Flood", "ddos", "ntp"),
    ("DoS-TCP_Flood", "ddos", "https"),
    ("DoS-SYN_Flood", "ddos", "http"),
    ("Mirai-greeth_flood", "botnet_c2", "other"),
    ("Mirai-udpplain", "botnet_c2", "dns"),
    ("Mirai-greip_flood", "botnet_c2", "other"),
    ("DDoS-ICMP_Fragmentation", "ddos", "other"),
    ("MITM-ArpSpoofing", "exfiltration", "other"),
    ("DDoS-UDP_Fragmentation", "ddos", "ntp"),
    ("DDoS-ACK_Fragmentation", "ddos", "https"),
    ("DNS_Spoofing", "exfiltration", "dns"),
    ("Recon-HostDiscovery", "port_scan", "other"),
    ("Recon-OSScan", "port_scan", "telnet"),
    ("Recon-PortScan", "port_scan", "ssh"),
    ("DoS-HTTP_Flood", "ddos", "http"),
    ("VulnerabilityScan", "port_scan", "http"),
    ("DDoS-HTTP_Flood", "ddos", "http"),
    ("DDoS-SlowLoris", "ddos", "http"),
    ("DictionaryBruteForce", "brute_force", "ssh"),
    ("BrowserHijacking", "exfiltration", "https"),
    ("CommandInjection", "brute_force", "http"),
    ("SqlInjection", "brute_force", "http"),
    ("XSS", "brute_force", "http"),
    ("Backdoor_Malware", "botnet_c2", "https"),
    ("Recon-PingSweep", "port_scan", "other"),
    ("Uploading_Attack", "exfiltration", "http"),
)
# Attack class shares fall geometrically: at 1,048,575 rows and 97.7 % attacks the largest
# class holds 17.6 % of the rows and the rarest about 320.
CICIOT_TAIL = 0.82
# Rows generated at a time in the profile's lean path: its float64 intermediates stay small.
_CHUNK = 65536


@dataclass(frozen=True)
class _Profile:
    """What a profile's attack classes look like; ``shares`` None draws them per site."""

    classes: tuple[str, ...]
    latent: np.ndarray
    services: np.ndarray
    affinity: np.ndarray
    shares: np.ndarray | None = None


def _ciciot_profile() -> _Profile:
    family = np.array([FAMILIES.index(f) for _, f, _ in _CICIOT_CLASSES])
    service = np.array([SERVICES.index(s) for _, _, s in _CICIOT_CLASSES])
    # Fixed offsets (not the run's seed), so the classes are the same in every run; at 1.5 noise
    # units a random forest on 60,000 rows reaches a macro-F1 of about 0.6 over the 34 classes.
    offset = np.random.default_rng(2023).normal(0.0, 1.5, (len(family), len(NOISE))) * NOISE
    shares = CICIOT_TAIL ** np.arange(len(family))
    return _Profile(
        classes=tuple(name for name, _, _ in _CICIOT_CLASSES),
        latent=FAMILY_LATENT[family] + offset,
        services=0.5 * FAMILY_SERVICES[family] + 0.5 * np.eye(len(SERVICES))[service],
        affinity=np.vstack([AFFINITY[0], AFFINITY[family + 1]]),
        shares=shares / shares.sum(),
    )


PROFILES = {
    "iot": _Profile(FAMILIES, FAMILY_LATENT, FAMILY_SERVICES, AFFINITY),
    "ciciot": _ciciot_profile(),
}
# The ciciot profile's features: the flow features, then one 0/1 column per named service and
# per transport (ICMP is neither), so all 47 are numeric, as in CICIoT2023's CSV files.
_INDICATORS = (*(f"service_{s}" for s in SERVICES[:-1]), "proto_tcp", "proto_udp")


def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """Draw one index per row of non-negative (unnormalised) ``weights``."""
    cum = np.cumsum(weights, axis=1)
    u = rng.random(len(weights)) * cum[:, -1]
    return np.minimum((cum < u[:, None]).sum(axis=1), weights.shape[1] - 1)


def _is_int(value: object) -> TypeGuard[int | np.integer]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> TypeGuard[int | float | np.integer | np.floating]:
    return _is_int(value) or isinstance(value, (float, np.floating))


def check_arguments(
    n_rows: object,
    n_sites: object,
    attack_share: object,
    overlap: object,
    concentration: object = 0.5,
    profile: object = "iot",
) -> list[str]:
    """What is wrong with the generator's settings; empty when it can generate.

    Returns
    -------
    list[str]
        One phrase per problem, naming the ``dataset.`` key.
    """
    rules = (
        ("n_rows", n_rows, _is_int(n_rows) and n_rows >= 1, "an integer of at least 1"),
        ("n_sites", n_sites, _is_int(n_sites) and n_sites >= 1, "an integer of at least 1"),
        (
            "attack_share",
            attack_share,
            _is_real(attack_share) and 0 <= attack_share < 1,
            "a number in [0, 1)",
        ),
        ("overlap", overlap, _is_real(overlap) and 0 <= overlap <= 1, "a number in [0, 1]"),
        (
            "concentration",
            concentration,
            _is_real(concentration) and concentration > 0,
            "a number greater than 0",
        ),
        (
            "profile",
            profile,
            isinstance(profile, str) and profile in PROFILES,
            f"one of {', '.join(PROFILES)}",
        ),
    )
    return [
        f"dataset.{name} must be {valid}, got {value!r}"
        for name, value, ok, valid in rules
        if not ok
    ]


def class_counts(n_attack: int, profile: str = "ciciot") -> np.ndarray:
    """Rows of each attack class of a profile with fixed class shares.

    Parameters
    ----------
    n_attack : int
        Attack rows to share out.
    profile : str
        A key of :data:`PROFILES` whose classes have fixed shares (``ciciot``).

    Returns
    -------
    np.ndarray
        One count per class, largest first, summing to ``n_attack``: the shares
        rounded by largest remainder.
    """
    # The documented precondition: a profile with fixed shares.
    exact = n_attack * cast(np.ndarray, PROFILES[profile].shares)
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact)[: n_attack - counts.sum()]] += 1
    return counts


def generate(
    n_rows: int = 30000,
    n_sites: int = 8,
    attack_share: float = 0.84,
    overlap: float = 0.35,
    seed: int = 0,
    concentration: float = 0.5,
    profile: str = "iot",
) -> pd.DataFrame:
    """Generate labelled IoT flows from several sites with different devices and attacks.

    Parameters
    ----------
    n_rows : int
        Number of flows (rows), at least 1.
    n_sites : int
        Number of sites, at least 1. Site sizes vary moderately.
    attack_share : float
        Share of attack rows in ``[0, 1)``; exact up to rounding to a whole row.
    overlap : float
        In ``[0, 1]``: the share of attacks that are stealthy (drawn part-way between the
        device's normal profile and the attack's), and, scaled by 0.4, of normal flows that
        burst toward an attack-like profile. Higher values make detection harder.
    seed : int
        Seed of the only random generator used; the same seed gives an identical frame.
    concentration : float
        Dirichlet concentration (> 0) of the per-site device and attack-family mixes; small
        values make sites more different (more non-IID).
    profile : str
        ``iot`` (the default frame below) or ``ciciot``: CICIoT2023's shape, 47 numeric
        ``float32`` features, a ``site`` column and a ``label`` column holding
        :data:`CICIOT_NORMAL` or one of 33 attack classes, whose counts
        :func:`class_counts` gives (a geometric long tail, spread over the sites at
        random). Built in chunks, so memory stays near the frame's own size.

    Returns
    -------
    pd.DataFrame
        One row per flow, in random order. Metadata: ``site`` (``site_00`` ...) and ``device``.
        Categorical features: ``protocol`` and ``service``. 36 numeric features (counts as
        ``int64``, the rest ``float64``; ``distinct_dst_ports``, ``distinct_dst_ips`` and
        ``src_conn_rate`` describe the source in the flow's time window). Labels:
        ``attack_type`` (``normal`` or one of :data:`FAMILIES`) and ``is_attack`` (0/1, a
        restatement of ``attack_type``: never use it as a feature).

    Raises
    ------
    FedadError
        If an argument is of the wrong type or out of range.
    """
    problems = check_arguments(n_rows, n_sites, attack_share, overlap, concentration, profile)
    if problems:
        raise FedadError(
            f"synthetic dataset: {'; '.join(problems)}. Fix it in conf/dataset/synthetic.yaml "
            "or on the command line."
        )
    rng = np.random.default_rng(seed)
    spec = PROFILES[profile]
    n_dev, n_fam = len(DEVICES), len(FAMILIES)

    # A small floor keeps every device and family present somewhere however peaked the draw.
    site_size = rng.dirichlet(np.full(n_sites, 4.0))
    device_mix = rng.dirichlet(np.full(n_dev, concentration), size=n_sites) + 0.02
    family_mix = rng.dirichlet(np.full(n_fam, concentration), size=n_sites) + 0.02
    attack_bias = rng.normal(0.0, 0.8, n_sites)
    # Sites sit on different networks (hop counts, link speeds): a small shift of every trait.
    site_shift = rng.normal(0.0, 0.3, (n_sites, len(NOISE))) * NOISE

    site = rng.choice(n_sites, size=n_rows, p=site_size)
    # Top-k of bias plus logistic noise: exactly the requested number of attacks, and a site's
    # bias shifts its attack log-odds, so every site keeps some normal traffic.
    n_attack = round(attack_share * n_rows)
    is_attack = np.zeros(n_rows, dtype=bool)
    is_attack[np.argsort(-(attack_bias[site] + rng.logistic(size=n_rows)))[:n_attack]] = True
    family = np.full(n_rows, -1)
    if spec.shares is None:
        family[is_attack] = _categorical(rng, family_mix[site[is_attack]])
    else:
        counts = class_counts(n_attack, profile)
        family[is_attack] = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    device = _categorical(rng, device_mix[site] * spec.affinity[family + 1])

    if spec.shares is not None:
        return _numeric_frame(rng, spec, overlap, site, site_shift, device, family)
    latent, svc, protocol = _traits(rng, spec, overlap, site_shift[site], device, family)
    f = _features(rng, latent, protocol)
    names = np.array(["normal", *FAMILIES])
    meta = {
        "site": np.char.add("site_", np.char.zfill(site.astype(str), 2)).astype(object),
        "device": np.array(DEVICES, dtype=object)[device],
        "protocol": protocol.astype(object),
        "service": np.array(SERVICES, dtype=object)[svc],
    }
    labels = {
        "attack_type": names.astype(object)[family + 1],
        "is_attack": (family >= 0).astype(np.int64),
    }
    return pd.DataFrame({**meta, **f, **labels})


def _traits(
    rng: np.random.Generator,
    spec: _Profile,
    overlap: float,
    shift: np.ndarray,
    device: np.ndarray,
    family: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Latent traits, service and protocol of flows with known device and class (-1: normal)."""
    n_rows = len(family)
    is_attack = family >= 0
    # Weight of the attack profile in each flow's traits (0 = the device's normal profile).
    weight = np.where(is_attack, rng.uniform(0.75, 1.0, n_rows), 0.0)
    stealthy = is_attack & (rng.random(n_rows) < overlap)
    weight[stealthy] = rng.uniform(0.35, 0.8, stealthy.sum())
    # Benign bursts (firmware updates, reconnect storms, scans by the hub) look attack-like.
    target = family.copy()
    bursty = ~is_attack & (rng.random(n_rows) < 0.4 * overlap)
    target[bursty] = rng.integers(len(spec.latent), size=bursty.sum())
    weight[bursty] = rng.uniform(0.1, 0.5, bursty.sum())
    target = np.maximum(target, 0)

    w = weight[:, None]
    base = DEVICE_LATENT[device]
    latent = base + w * (spec.latent[target] - base) + shift + rng.normal(size=base.shape) * NOISE
    svc = _categorical(rng, (1 - w) * DEVICE_SERVICES[device] + w * spec.services[target])
    protocol = SERVICE_PROTOCOL[svc]
    other = protocol == ""
    protocol[other] = rng.choice(OTHER_PROTOCOLS, size=other.sum(), p=OTHER_P)
    return latent, svc, protocol


def _numeric_frame(
    rng: np.random.Generator,
    spec: _Profile,
    overlap: float,
    site: np.ndarray,
    site_shift: np.ndarray,
    device: np.ndarray,
    family: np.ndarray,
) -> pd.DataFrame:
    """The ``ciciot`` profile's frame, built ``_CHUNK`` rows at a time into one float32 block."""
    n_rows = len(family)
    block, names = None, []
    for start in range(0, n_rows, _CHUNK):
        rows = slice(start, start + _CHUNK)
        latent, svc, protocol = _traits(
            rng, spec, overlap, site_shift[site[rows]], device[rows], family[rows]
        )
        f = _features(rng, latent, protocol)
        for i, service in enumerate(SERVICES[:-1]):
            f[f"service_{service}"] = svc == i
        f["proto_tcp"] = np.isin(protocol, ["tcp", "mqtt"])
        f["proto_udp"] = np.isin(protocol, ["udp", "coap"])
        if block is None:
            names = list(f)
            block = np.empty((n_rows, len(names)), dtype=np.float32)
        for j, values in enumerate(f.values()):
            block[rows, j] = values
    frame = pd.DataFrame(block, columns=names, copy=False)
    sites = [f"site_{i:02d}" for i in range(len(site_shift))]
    frame.insert(0, "site", pd.Categorical.from_codes(site, sites))
    frame["label"] = pd.Categorical.from_codes(family + 1, [CICIOT_NORMAL, *spec.classes])
    return frame


def _features(
    rng: np.random.Generator, latent: np.ndarray, protocol: np.ndarray
) -> dict[str, np.ndarray]:
    """Turn latent traits into observable, mutually consistent flow features."""
    n = len(latent)
    t = np.exp(latent[:, :N_LOG])
    ttl, flag_p = latent[:, N_LOG], np.clip(latent[:, N_LOG + 1 :], 0.0, 1.0)
    tcp = np.isin(protocol, ["tcp", "mqtt"])
    header = np.where(tcp, 40.0, 28.0)

    fwd = np.maximum(1, np.rint(t[:, 0])).astype(np.int64)
    bwd = np.floor(t[:, 1]).astype(np.int64)
    total = fwd + bwd
    fwd_pay = np.minimum(t[:, 2], MTU_PAYLOAD)
    bwd_pay = np.where(bwd > 0, np.minimum(t[:, 3], MTU_PAYLOAD), 0.0)
    pay_cv, iat_cv = t[:, 6], t[:, 5]
    # Extremes of k draws sit about sqrt(2 ln k) standard deviations from the mean.
    spread = np.sqrt(2 * np.log1p(total))
    duration = t[:, 4]
    fwd_bytes, bwd_bytes = fwd * (fwd_pay + header), bwd * (bwd_pay + header)
    iat_mean = duration / np.maximum(total - 1, 1)

    f = {
        "duration": duration,
        "fwd_packets": fwd,
        "bwd_packets": bwd,
        "total_packets": total,
        "fwd_bytes": fwd_bytes,
        "bwd_bytes": bwd_bytes,
        "total_bytes": fwd_bytes + bwd_bytes,
        "fwd_header_bytes": fwd * header,
        "bwd_header_bytes": bwd * header,
        "fwd_payload_mean": fwd_pay,
        "fwd_payload_std": np.where(fwd > 1, fwd_pay * pay_cv, 0.0),
        "bwd_payload_mean": bwd_pay,
        "bwd_payload_std": np.where(bwd > 1, bwd_pay * pay_cv, 0.0),
        "payload_min": np.minimum(fwd_pay, np.where(bwd > 0, bwd_pay, fwd_pay))
        * np.clip(1 - pay_cv * spread / 3, 0.0, 1.0),
        "payload_max": np.minimum(
            np.maximum(fwd_pay, bwd_pay) * (1 + pay_cv * spread / 3), MTU_PAYLOAD
        ),
        "avg_packet_size": (fwd_bytes + bwd_bytes) / total,
        "iat_mean": iat_mean,
        "iat_std": iat_mean * iat_cv,
        "iat_min": iat_mean / (1 + iat_cv * spread),
        "iat_max": np.minimum(iat_mean * (1 + iat_cv * spread), duration),
        "bytes_per_s": (fwd_bytes + bwd_bytes) / duration,
        "packets_per_s": total / duration,
        "fwd_packets_per_s": fwd / duration,
        "down_up_ratio": bwd_bytes / fwd_bytes,
    }
    # A TCP flow opens with at least one SYN; UDP, CoAP and ICMP carry no TCP flags.
    flags = rng.binomial(total[:, None], flag_p) * tcp[:, None]
    flags[:, 0] = np.maximum(flags[:, 0], tcp)
    for i, name in enumerate(("syn", "ack", "fin", "rst", "psh", "urg")):
        f[f"{name}_count"] = flags[:, i]
    window = np.clip(np.rint(t[:, 7]), 1, 65535).astype(np.int64)
    bwd_window = np.clip(np.rint(t[:, 7] * np.exp(rng.normal(0.0, 0.3, n))), 1, 65535)
    f["init_win_fwd"] = window * tcp
    f["init_win_bwd"] = bwd_window.astype(np.int64) * (tcp & (bwd > 0))
    f["distinct_dst_ports"] = np.maximum(1, np.rint(t[:, 8])).astype(np.int64)
    f["distinct_dst_ips"] = np.maximum(1, np.rint(t[:, 9])).astype(np.int64)
    f["src_conn_rate"] = t[:, 10]
    f["ttl_mean"] = np.clip(ttl, 1.0, 255.0)
    return f
