// SPDX-License-Identifier: Apache-2.0
//! Named sets of block rules, one per cloud, and `default` for all of them at once.
//!
//! Port 53 stays open wherever a metadata address also serves DNS (GCE, OCI, some
//! OpenStack deployments), and is kept open on the other metadata addresses too, so
//! that no preset can break name resolution.
//!
//! Each cloud's documented metadata addresses, checked again for issue 24 (the test
//! `every_documented_metadata_address_is_in_default` holds this list):
//!
//! | cloud | addresses | source |
//! | --- | --- | --- |
//! | AWS EC2 | 169.254.169.254, fd00:ec2::254 | <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html> |
//! | AWS ECS (not in `default`: `aws-ecs`) | 169.254.170.2 | <https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-metadata-endpoint.html> |
//! | EKS Pod Identity Agent (open: pods are meant to use it) | 169.254.170.23, fd00:ec2::23 | <https://docs.aws.amazon.com/eks/latest/userguide/pod-id-agent-setup.html> |
//! | GCE (`metadata.google.internal`) | 169.254.169.254, fd20:ce::254 | <https://cloud.google.com/compute/docs/metadata/overview> |
//! | Azure | 169.254.169.254; WireServer 168.63.129.16 | <https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service>, <https://learn.microsoft.com/azure/virtual-network/what-is-ip-address-168-63-129-16> |
//! | OCI | 169.254.169.254, 192.0.0.192, fd00:c1::a9fe:a9fe | <https://docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm> |
//! | Alibaba Cloud | 100.100.100.200 | <https://cloudinit.readthedocs.io/en/latest/reference/datasources/aliyun.html> |
//! | Tencent Cloud (`metadata.tencentyun.com`) | 169.254.0.23 | <https://www.tencentcloud.com/document/product/213/4934>; the address: DataDog/datadog-agent `pkg/util/cloudproviders/tencent` (`http://169.254.0.23`) |
//! | Huawei Cloud (OpenStack-compatible) | 169.254.169.254 | <https://support.huaweicloud.com/intl/en-us/usermanual-ecs/ecs_03_2167.html> |
//! | OpenStack Nova | 169.254.169.254, fe80::a9fe:a9fe | <https://specs.openstack.org/openstack/neutron-specs/specs/ussuri/metadata-add-ipv6-support.html> |
//! | DigitalOcean | 169.254.169.254 | <https://docs.digitalocean.com/products/droplets/how-to/access-metadata/> |
//! | Hetzner Cloud | 169.254.169.254 | hetznercloud/hcloud-go `metadata` (`http://169.254.169.254/hetzner/v1/metadata`) |
//! | Akamai (Linode) | 169.254.169.254, fd00:a9fe:a9fe::1 | <https://cloudinit.readthedocs.io/en/latest/reference/datasources/akamai.html> |
//! | IBM Cloud VPC | 169.254.169.254 (`api.metadata.cloud.ibm.com`) | <https://cloud.ibm.com/apidocs/vpc-identity> |
//! | Exoscale | 169.254.169.254 (its password server on port 8080 too) | <https://cloudinit.readthedocs.io/en/latest/reference/datasources/exoscale.html> |
//! | Scaleway | 169.254.42.42, fd00:42::42 | <https://cloudinit.readthedocs.io/en/latest/reference/datasources/scaleway.html> |
//!
//! Not metadata, so in no preset: IBM Cloud classic's 161.26.0.0/16 is its private
//! service network (DNS resolvers, NTP, storage, provisioning:
//! <https://cloud.ibm.com/docs/security-groups?topic=security-groups-ibm-cloud-ip-ranges>);
//! blocking it would break name resolution. IBM classic serves no link-local metadata.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::IpNet;

use super::BlockRule;

const IMDS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const AWS_IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
const AWS_ECS_TASK_METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 2);
const AZURE_WIRESERVER: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// The WireServer's guest-agent and host-plugin ports; its port 53 is Azure DNS.
const AZURE_WIRESERVER_PORTS: [u16; 2] = [80, 32526];
const ALIBABA_METADATA: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 200);
/// Tencent Cloud CVM metadata (`metadata.tencentyun.com`), where CAM role credentials
/// are served at `/latest/meta-data/cam/security-credentials/`.
const TENCENT_METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 23);
const ORACLE_METADATA_ALT: Ipv4Addr = Ipv4Addr::new(192, 0, 0, 192);
const OPENSTACK_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xa9fe, 0xa9fe);
/// GCE's metadata server for IPv6-only instances.
const GCP_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254);
/// OCI's metadata service over IPv6 (its SDK's `DEFAULT_METADATA_URL_BASE_IPV6`).
const ORACLE_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc1, 0, 0, 0, 0, 0xa9fe, 0xa9fe);
const SCALEWAY_METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 42);
const SCALEWAY_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42);
const AKAMAI_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa9fe, 0xa9fe, 0, 0, 0, 0, 1);
const DNS: [u16; 1] = [53];
/// Port 53 and the HTTP port that GKE's node DNATs to its own metadata server.
const DNS_AND_GKE_METADATA: [u16; 2] = [53, 80];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Preset {
    Default,
    Aws,
    AwsEcs,
    Gcp,
    Azure,
    Alibaba,
    Tencent,
    Oracle,
    Openstack,
    Scaleway,
    Akamai,
    GkeWorkloadIdentity,
}

impl Preset {
    pub(crate) const ALL: [Preset; 12] = [
        Preset::Default,
        Preset::Aws,
        Preset::AwsEcs,
        Preset::Gcp,
        Preset::GkeWorkloadIdentity,
        Preset::Azure,
        Preset::Alibaba,
        Preset::Tencent,
        Preset::Oracle,
        Preset::Openstack,
        Preset::Scaleway,
        Preset::Akamai,
    ];

    /// The clouds whose metadata addresses `default` blocks.
    const CLOUDS: [Preset; 9] = [
        Preset::Aws,
        Preset::Gcp,
        Preset::Azure,
        Preset::Alibaba,
        Preset::Tencent,
        Preset::Oracle,
        Preset::Openstack,
        Preset::Scaleway,
        Preset::Akamai,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Preset::Default => "default",
            Preset::Aws => "aws",
            Preset::AwsEcs => "aws-ecs",
            Preset::Gcp => "gcp",
            Preset::Azure => "azure",
            Preset::Alibaba => "alibaba",
            Preset::Tencent => "tencent",
            Preset::Oracle => "oracle",
            Preset::Openstack => "openstack",
            Preset::Scaleway => "scaleway",
            Preset::Akamai => "akamai",
            Preset::GkeWorkloadIdentity => "gke-workload-identity",
        }
    }

    /// What the preset blocks, what it leaves open and why, for operators.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Preset::Default => {
                "The metadata addresses of every supported cloud at once, for clusters that run \
                 anywhere: 169.254.169.254, fd00:ec2::254, fd20:ce::254, fd00:c1::a9fe:a9fe, \
                 fe80::a9fe:a9fe and fd00:a9fe:a9fe::1 (all ports but 53), 100.100.100.200, \
                 169.254.0.23, 192.0.0.192, 169.254.42.42 and fd00:42::42 (all ports) and Azure's WireServer \
                 168.63.129.16 (ports 80 and 32526 only). DNS on port 53 stays open everywhere. Not \
                 included: the ECS task metadata endpoint (use aws-ecs) and the EKS Pod Identity \
                 Agent, which pods are meant to reach."
            }
            Preset::Aws => {
                "AWS instance metadata (IMDS) at 169.254.169.254 and, on Nitro instances, \
                 fd00:ec2::254: every protocol and port except 53, so no resolver setup that points \
                 there can break. The EKS Pod Identity Agent (169.254.170.23, fd00:ec2::23) stays \
                 open: it is how pods are meant to get AWS credentials."
            }
            Preset::AwsEcs => {
                "Everything aws blocks, plus the ECS task metadata and credentials endpoint \
                 169.254.170.2 on every port, for nodes that also run the ECS agent."
            }
            Preset::Gcp => {
                "The GCE metadata server (metadata.google.internal) at 169.254.169.254 and, for \
                 IPv6-only instances, fd20:ce::254: every protocol and port except 53, because the \
                 same address is the VPC's DNS resolver that GKE pods use."
            }
            Preset::GkeWorkloadIdentity => {
                "For GKE nodes with Workload Identity, where the node DNATs pods' \
                 169.254.169.254:80 to the GKE metadata server (which answers each pod with its own \
                 identity): what gcp blocks, except that a pod's connect to 169.254.169.254:80 \
                 passes the socket hooks and is judged in the node after the DNAT instead. It \
                 reaches the GKE metadata server; the real metadata server stays blocked (without \
                 the DNAT the node refuses the packet)."
            }
            Preset::Azure => {
                "Azure instance metadata (IMDS) at 169.254.169.254, every port but 53, and the \
                 WireServer 168.63.129.16 on ports 80 and 32526 only, where the VM agent fetches \
                 its goal state and extension settings. The WireServer's port 53 is Azure DNS and \
                 stays open, as do its other services."
            }
            Preset::Alibaba => {
                "Alibaba Cloud ECS instance metadata at 100.100.100.200, every protocol and port: \
                 nothing else is served there."
            }
            Preset::Tencent => {
                "Tencent Cloud CVM instance metadata (metadata.tencentyun.com) at 169.254.0.23, \
                 every protocol and port: it serves CAM role credentials at \
                 /latest/meta-data/cam/security-credentials/ and nothing else (Tencent's DNS \
                 resolvers have addresses of their own)."
            }
            Preset::Oracle => {
                "OCI instance metadata at 169.254.169.254 and fd00:c1::a9fe:a9fe, every port but 53 \
                 (OCI's resolver answers there), and its other metadata address 192.0.0.192 on \
                 every port."
            }
            Preset::Scaleway => {
                "Scaleway instance metadata at 169.254.42.42 and fd00:42::42, every protocol and \
                 port: nothing else is served there."
            }
            Preset::Akamai => {
                "Akamai (Linode) metadata at 169.254.169.254 and fd00:a9fe:a9fe::1, every port \
                 but 53."
            }
            Preset::Openstack => {
                "OpenStack Nova metadata at 169.254.169.254 and its IPv6 address fe80::a9fe:a9fe, \
                 every port but 53, which some deployments use for DNS."
            }
        }
    }

    /// Rules only the host side applies, on top of [`Preset::rules`]: destinations the
    /// socket hooks leave to the node because the node rewrites them (DNAT) to an
    /// allowed place, and the host side judges after the rewrite.
    pub(crate) fn host_side_rules(self) -> Vec<BlockRule> {
        match self {
            Preset::GkeWorkloadIdentity => vec![BlockRule::only(host(IMDS), &[80])],
            _ => Vec::new(),
        }
    }

    pub(crate) fn rules(self) -> Vec<BlockRule> {
        match self {
            Preset::Default => {
                let mut union: Vec<BlockRule> = Vec::new();
                for rule in Preset::CLOUDS.iter().flat_map(|cloud| cloud.rules()) {
                    if !union.contains(&rule) {
                        union.push(rule);
                    }
                }
                union
            }
            Preset::Aws => vec![BlockRule::except(host(IMDS), &DNS), BlockRule::except(host(AWS_IMDS_V6), &DNS)],
            Preset::AwsEcs => {
                let mut rules = Preset::Aws.rules();
                rules.push(BlockRule::all(host(AWS_ECS_TASK_METADATA)));
                rules
            }
            Preset::Gcp => vec![BlockRule::except(host(IMDS), &DNS), BlockRule::except(host(GCP_METADATA_V6), &DNS)],
            Preset::GkeWorkloadIdentity => vec![
                BlockRule::except(host(IMDS), &DNS_AND_GKE_METADATA),
                BlockRule::except(host(GCP_METADATA_V6), &DNS),
            ],
            Preset::Azure => vec![
                BlockRule::except(host(IMDS), &DNS),
                BlockRule::only(host(AZURE_WIRESERVER), &AZURE_WIRESERVER_PORTS),
            ],
            Preset::Alibaba => vec![BlockRule::all(host(ALIBABA_METADATA))],
            Preset::Tencent => vec![BlockRule::all(host(TENCENT_METADATA))],
            Preset::Oracle => vec![
                BlockRule::except(host(IMDS), &DNS),
                BlockRule::except(host(ORACLE_METADATA_V6), &DNS),
                BlockRule::all(host(ORACLE_METADATA_ALT)),
            ],
            Preset::Scaleway => {
                vec![BlockRule::all(host(SCALEWAY_METADATA)), BlockRule::all(host(SCALEWAY_METADATA_V6))]
            }
            Preset::Akamai => {
                vec![BlockRule::except(host(IMDS), &DNS), BlockRule::except(host(AKAMAI_METADATA_V6), &DNS)]
            }
            Preset::Openstack => {
                vec![BlockRule::except(host(IMDS), &DNS), BlockRule::except(host(OPENSTACK_METADATA_V6), &DNS)]
            }
        }
    }
}

fn host(addr: impl Into<IpAddr>) -> IpNet {
    IpNet::from(addr.into())
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown preset `{0}`; choose one of default, aws, aws-ecs, gcp, gke-workload-identity, azure, alibaba, tencent, \
     oracle, openstack, scaleway, akamai"
)]
pub(crate) struct UnknownPreset(pub String);

impl FromStr for Preset {
    type Err = UnknownPreset;

    fn from_str(name: &str) -> Result<Preset, UnknownPreset> {
        let name = name.trim();
        Preset::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| UnknownPreset(name.to_owned()))
    }
}

#[cfg(test)]
mod tests;
