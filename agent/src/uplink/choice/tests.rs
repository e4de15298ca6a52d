// SPDX-License-Identifier: Apache-2.0
use super::*;

fn dev(index: u32, name: &str, kind: &str) -> Device {
    Device { index, name: name.into(), hw_type: ARPHRD_ETHER, kind: kind.into(), ..Device::default() }
}

fn route(dst: &str, devices: &[u32]) -> Route {
    let net: IpNet = dst.parse().unwrap();
    Route { table: 254, kind: RTN_UNICAST, dst: net.addr(), prefix_len: net.prefix_len(), devices: devices.to_vec() }
}

fn imds() -> Vec<IpNet> {
    vec!["169.254.169.254/32".parse().unwrap(), "fd00:ec2::254/128".parse().unwrap()]
}

fn names(uplinks: &[Uplink]) -> Vec<&str> {
    uplinks.iter().map(|u| u.name.as_str()).collect()
}

/// A node as clouds build them: a NIC, a bond of two, a VLAN on the bond, loopback,
/// pods' veths, a bridge for pods, a macvlan child on a NIC, a WireGuard tunnel.
fn node() -> Vec<Device> {
    let mut lo = dev(1, "lo", "");
    lo.hw_type = 772;
    lo.flags = IFF_LOOPBACK;
    let mut slave = dev(3, "ens6", "");
    slave.master = Some(4);
    let mut vlan = dev(5, "bond0.100", "vlan");
    vlan.link = Some(4);
    let mut pod = dev(6, "veth1234", "veth");
    pod.link = Some(2);
    pod.link_netnsid = Some(0);
    let mut mv = dev(8, "mv-multus", "macvlan");
    mv.link = Some(9);
    let mut wg = dev(10, "wg0", "wireguard");
    wg.hw_type = 65534;
    vec![
        lo,
        dev(2, "eth0", ""),
        slave,
        dev(4, "bond0", "bond"),
        vlan,
        pod,
        dev(7, "cni0", "bridge"),
        mv,
        dev(9, "eth1", ""),
        wg,
    ]
}

#[test]
fn nics_bonds_vlans_and_macvlan_lower_devices_are_uplinks_and_loopback_and_pods_are_not() {
    let chosen = choose(&node(), &[], &imds(), &UplinkSpec::Auto);
    assert_eq!(names(&chosen), ["eth0", "ens6", "bond0", "bond0.100", "eth1"]);
    assert_eq!(chosen[1].reason, Reason::Nic);
    assert_eq!(chosen[2].reason, Reason::Aggregate("bond".into()));
}

#[test]
fn a_device_with_a_route_to_a_blocked_destination_is_an_uplink() {
    let mut devices = node();
    // A veth to another namespace that carries the route to the metadata service (the
    // node's link out in a test world) is chosen; a pod's veth with its /32 is not.
    let mut out = dev(11, "node-out", "veth");
    out.link_netnsid = Some(3);
    devices.push(out);
    let routes = [
        route("169.254.169.254/32", &[11]),
        route("10.244.0.7/32", &[6]),
        route("0.0.0.0/0", &[7]),
        route("::/0", &[10]),
    ];
    let chosen = choose(&devices, &routes, &imds(), &UplinkSpec::Auto);
    assert!(names(&chosen).contains(&"node-out"));
    assert!(names(&chosen).contains(&"cni0"), "a bridge with a default route carries the metadata address");
    assert!(!names(&chosen).contains(&"veth1234"));
    assert!(!names(&chosen).contains(&"wg0"), "no Ethernet header: not parsed, not chosen");
    let out = chosen.iter().find(|u| u.name == "node-out").unwrap();
    assert_eq!(out.reason, Reason::Route("169.254.169.254/32".parse().unwrap()));
}

#[test]
fn local_routes_and_other_families_do_not_make_an_uplink() {
    let devices = [dev(20, "dummy0", "dummy"), dev(21, "vx", "vxlan")];
    let mut local = route("169.254.169.254/32", &[20]);
    local.kind = 2; // RTN_LOCAL: the stand-in on the node itself
    let v6_only = route("fd00::/8", &[21]);
    let chosen =
        choose(&devices, &[local, v6_only.clone()], &["169.254.169.254/32".parse().unwrap()], &UplinkSpec::Auto);
    assert!(chosen.is_empty(), "{chosen:?}");
    let chosen = choose(&devices, &[v6_only], &imds(), &UplinkSpec::Auto);
    assert_eq!(names(&chosen), ["vx"], "fd00::/8 contains fd00:ec2::254");
}

#[test]
fn named_uplinks_are_exactly_those_that_exist_and_none_is_none() {
    let spec = UplinkSpec::parse("eth1, wg0,missing").unwrap();
    let chosen = choose(&node(), &[], &imds(), &spec);
    assert_eq!(names(&chosen), ["eth1"], "wg0 has no Ethernet header, `missing` does not exist");
    assert!(choose(&node(), &[], &imds(), &UplinkSpec::None).is_empty());
    assert_eq!(UplinkSpec::parse("auto").unwrap(), UplinkSpec::Auto);
    assert!(UplinkSpec::parse("eth0,,eth1").unwrap_err().contains("not an interface name"));
    assert!(UplinkSpec::parse("a-name-longer-than-15").is_err());
    assert_eq!(spec.to_string(), "eth1,wg0,missing");
}
