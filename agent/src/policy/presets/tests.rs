// SPDX-License-Identifier: Apache-2.0
//! Each preset blocks what it says, leaves DNS open, and compiles.

use metadata_guard_common::{PROTO_OTHER, PROTO_TCP, PROTO_UDP};

use super::*;
use crate::policy::{compile, CompiledPolicy, PortMatch};

fn listed(preset: Preset) -> Vec<String> {
    preset.rules().iter().map(BlockRule::to_string).collect()
}

fn compiled(preset: Preset) -> CompiledPolicy {
    compile(&preset.rules()).unwrap_or_else(|e| panic!("preset {preset} does not compile: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn each_preset_lists_its_clouds_metadata_addresses() {
    let imds = "169.254.169.254/32 except ports 53";
    assert_eq!(listed(Preset::Aws), [imds, "fd00:ec2::254/128 except ports 53"]);
    assert_eq!(listed(Preset::AwsEcs), [imds, "fd00:ec2::254/128 except ports 53", "169.254.170.2/32"]);
    assert_eq!(listed(Preset::Gcp), [imds, "fd20:ce::254/128 except ports 53"]);
    assert_eq!(
        listed(Preset::GkeWorkloadIdentity),
        ["169.254.169.254/32 except ports 53,80", "fd20:ce::254/128 except ports 53"]
    );
    assert_eq!(listed(Preset::Scaleway), ["169.254.42.42/32", "fd00:42::42/128"]);
    assert_eq!(listed(Preset::Akamai), [imds, "fd00:a9fe:a9fe::1/128 except ports 53"]);
    assert_eq!(listed(Preset::Azure), [imds, "168.63.129.16/32 ports 80,32526"]);
    assert_eq!(listed(Preset::Alibaba), ["100.100.100.200/32"]);
    assert_eq!(listed(Preset::Tencent), ["169.254.0.23/32"]);
    assert_eq!(listed(Preset::Oracle), [imds, "fd00:c1::a9fe:a9fe/128 except ports 53", "192.0.0.192/32"]);
    assert_eq!(listed(Preset::Openstack), [imds, "fe80::a9fe:a9fe/128 except ports 53"]);
}

#[test]
fn default_is_every_cloud_once_without_ecs() {
    let mut default = listed(Preset::Default);
    default.sort();
    assert_eq!(
        default,
        [
            "100.100.100.200/32",
            "168.63.129.16/32 ports 80,32526",
            "169.254.0.23/32",
            "169.254.169.254/32 except ports 53",
            "169.254.42.42/32",
            "192.0.0.192/32",
            "fd00:42::42/128",
            "fd00:a9fe:a9fe::1/128 except ports 53",
            "fd00:c1::a9fe:a9fe/128 except ports 53",
            "fd00:ec2::254/128 except ports 53",
            "fd20:ce::254/128 except ports 53",
            "fe80::a9fe:a9fe/128 except ports 53",
        ]
    );
}

#[test]
fn the_shared_imds_address_of_two_presets_is_stored_once() {
    let mut rules = Preset::Aws.rules();
    rules.extend(Preset::Gcp.rules());
    let policy = compile(&rules).unwrap();
    assert_eq!(policy.v4, compiled(Preset::Aws).v4);
    assert_eq!(policy.v4[0].1.rule_count, 1);
}

#[test]
fn every_preset_blocks_what_it_lists() {
    for preset in Preset::ALL {
        let policy = compiled(preset);
        for rule in preset.rules() {
            let addr = rule.cidr.addr();
            let (blocked_port, open_port) = match &rule.ports {
                PortMatch::Only(ports) => (ports[0], Some(443)),
                PortMatch::Except(ports) => {
                    ([80, 443].into_iter().find(|p| !ports.contains(p)).unwrap(), Some(ports[0]))
                }
                PortMatch::Any => (53, None),
            };
            for proto in [PROTO_TCP, PROTO_UDP] {
                assert!(
                    policy.blocks(addr, proto, blocked_port),
                    "{preset}: {rule} must block {addr} port {blocked_port}"
                );
                if let Some(port) = open_port {
                    assert!(!policy.blocks(addr, proto, port), "{preset}: {rule} must leave {addr} port {port} open");
                }
            }
        }
    }
}

#[test]
fn no_preset_blocks_dns_or_neighbouring_addresses() {
    let dns_servers = ["169.254.169.254", "fd00:ec2::254", "168.63.129.16", "fe80::a9fe:a9fe", "169.254.169.253"];
    let never_blocked = [
        "169.254.169.253",
        "169.254.169.255",
        "169.254.170.23",
        "fd00:ec2::23",
        "fd00:ec2::253",
        "100.100.100.201",
        "169.254.0.22",
        "169.254.0.24",
        "192.0.0.193",
        "168.63.129.17",
        "fe80::a9fe:a9ff",
        "8.8.8.8",
    ];
    for preset in Preset::ALL {
        let policy = compiled(preset);
        for addr in dns_servers {
            for proto in [PROTO_TCP, PROTO_UDP] {
                assert!(!policy.blocks(ip(addr), proto, 53), "{preset} blocks DNS at {addr}");
            }
        }
        for addr in never_blocked {
            for (proto, port) in [(PROTO_TCP, 80), (PROTO_UDP, 80), (PROTO_TCP, 443), (PROTO_OTHER, 0)] {
                assert!(!policy.blocks(ip(addr), proto, port), "{preset} blocks {addr} port {port}");
            }
        }
    }
}

#[test]
fn imds_is_blocked_for_every_protocol_and_through_ipv4_mapped_addresses() {
    let policy = compiled(Preset::Default);
    assert!(policy.blocks(ip("169.254.169.254"), PROTO_OTHER, 0), "ping and raw IP");
    assert!(policy.blocks(ip("::ffff:169.254.169.254"), PROTO_TCP, 80));
    assert!(policy.blocks(ip("::ffff:100.100.100.200"), PROTO_UDP, 53));
}

#[test]
fn gke_workload_identity_leaves_port_80_to_the_host_side_which_blocks_it() {
    let sockets = compiled(Preset::GkeWorkloadIdentity);
    assert!(!sockets.blocks(ip("169.254.169.254"), PROTO_TCP, 80), "the node DNATs it to the GKE server");
    assert!(sockets.blocks(ip("169.254.169.254"), PROTO_TCP, 443));
    let mut host = Preset::GkeWorkloadIdentity.rules();
    host.extend(Preset::GkeWorkloadIdentity.host_side_rules());
    let host = compile(&host).unwrap();
    assert!(host.blocks(ip("169.254.169.254"), PROTO_TCP, 80), "without the DNAT it is the real server");
    assert!(!host.blocks(ip("169.254.169.254"), PROTO_UDP, 53));
    assert!(Preset::ALL.iter().filter(|p| **p != Preset::GkeWorkloadIdentity).all(|p| p.host_side_rules().is_empty()));
}

#[test]
fn ecs_task_metadata_is_only_blocked_by_aws_ecs() {
    let ecs = ip("169.254.170.2");
    assert!(compiled(Preset::AwsEcs).blocks(ecs, PROTO_TCP, 80));
    assert!(!compiled(Preset::Aws).blocks(ecs, PROTO_TCP, 80));
    assert!(!compiled(Preset::Default).blocks(ecs, PROTO_TCP, 80));
}

#[test]
fn presets_are_named_in_kebab_case() {
    for preset in Preset::ALL {
        assert_eq!(preset.name().parse::<Preset>(), Ok(preset));
        assert!(!preset.describe().is_empty());
    }
    assert_eq!("aws_ecs".parse::<Preset>(), Err(UnknownPreset("aws_ecs".into())));
    let help = UnknownPreset("x".into()).to_string();
    assert!(Preset::ALL.iter().all(|p| help.contains(p.name())), "{help}");
}

/// Every cloud's documented metadata addresses (sources in the module doc of
/// `presets.rs`) are blocked by `default` on the port their credentials are served on,
/// and the addresses pods are meant to reach stay open.
#[test]
fn every_documented_metadata_address_is_in_default() {
    let default = compiled(Preset::Default);
    let documented = [
        ("AWS EC2", "169.254.169.254"),
        ("AWS EC2 over IPv6", "fd00:ec2::254"),
        ("GCE", "169.254.169.254"),
        ("GCE, IPv6-only instances", "fd20:ce::254"),
        ("Azure IMDS", "169.254.169.254"),
        ("Azure WireServer", "168.63.129.16"),
        ("OCI", "169.254.169.254"),
        ("OCI", "192.0.0.192"),
        ("OCI over IPv6", "fd00:c1::a9fe:a9fe"),
        ("Alibaba Cloud", "100.100.100.200"),
        ("Tencent Cloud", "169.254.0.23"),
        ("Huawei Cloud", "169.254.169.254"),
        ("OpenStack over IPv6", "fe80::a9fe:a9fe"),
        ("DigitalOcean", "169.254.169.254"),
        ("Hetzner Cloud", "169.254.169.254"),
        ("Akamai (Linode) over IPv6", "fd00:a9fe:a9fe::1"),
        ("IBM Cloud VPC", "169.254.169.254"),
        ("Exoscale", "169.254.169.254"),
        ("Scaleway", "169.254.42.42"),
        ("Scaleway over IPv6", "fd00:42::42"),
    ];
    for (cloud, addr) in documented {
        assert!(default.blocks(ip(addr), PROTO_TCP, 80), "default leaves {cloud}'s {addr}:80 open");
    }
    // Exoscale's password server shares the metadata address.
    assert!(default.blocks(ip("169.254.169.254"), PROTO_TCP, 8080));
    assert!(compiled(Preset::Tencent).blocks(ip("169.254.0.23"), PROTO_TCP, 80));
    for (what, addr) in [("EKS Pod Identity Agent", "169.254.170.23"), ("EKS Pod Identity Agent", "fd00:ec2::23")] {
        assert!(!default.blocks(ip(addr), PROTO_TCP, 80), "default blocks the {what} at {addr}, which pods need");
    }
    // IBM classic's service network is DNS and NTP, not metadata.
    assert!(!default.blocks(ip("161.26.0.10"), PROTO_UDP, 53));
}
