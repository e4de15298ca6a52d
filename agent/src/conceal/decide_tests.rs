use super::*;
use crate::conceal::ExtraPaths;

/// Decides a request given as a raw path (with optional query) and headers.
fn judge(method: &str, target: &str, headers: &[(&str, &str)], extras: &[&ExtraPaths]) -> Decision {
    let (raw, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let path = match NormalPath::parse(raw) {
        Ok(p) => p,
        Err(e) => return refuse(UNKNOWN_STATUS, "bad-path", &e.to_string()),
    };
    let lookup = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    decide(&Request { method, path: &path, query, header: &lookup }, extras)
}

fn passes(method: &str, target: &str, headers: &[(&str, &str)]) -> bool {
    matches!(judge(method, target, headers, &[]), Decision::Pass { .. })
}

fn refused_by(method: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match judge(method, target, headers, &[]) {
        Decision::Refuse { status, rule, .. } => (status, rule),
        pass => panic!("{method} {target} passed: {pass:?}"),
    }
}

const GOOGLE: &[(&str, &str)] = &[("Metadata-Flavor", "Google")];
const AZURE: &[(&str, &str)] = &[("Metadata", "true")];

#[test]
fn aws_sdks_find_region_zone_and_token() {
    assert!(passes("PUT", "/latest/api/token", &[]));
    assert!(passes("GET", "/latest/meta-data/", &[]));
    assert!(passes("GET", "/latest/meta-data/placement/availability-zone/", &[]));
    assert!(passes("GET", "/latest/meta-data/placement/region", &[]));
    assert!(passes("GET", "/latest/meta-data/placement/", &[]));
    assert!(passes("GET", "/2021-07-15/meta-data/instance-id", &[]));
    assert!(passes("HEAD", "/latest/meta-data/instance-type", &[]));
    assert!(passes("GET", "/latest/meta-data/spot/instance-action", &[]));
    assert!(passes("GET", "/latest/meta-data/events/maintenance/scheduled", &[]));
    assert!(passes("GET", "/latest/dynamic/instance-identity/document", &[]));
}

#[test]
fn aws_credentials_and_what_trades_for_them_are_refused_with_404() {
    assert_eq!(
        refused_by("GET", "/latest/meta-data/iam/security-credentials/", &[]),
        (404, "aws-iam-credentials".into())
    );
    assert_eq!(refused_by("GET", "/latest/meta-data/iam/info", &[]).1, "aws-iam-credentials");
    assert_eq!(refused_by("GET", "/latest/meta-data/identity-credentials/ec2/info", &[]).1, "aws-identity-credentials");
    assert_eq!(refused_by("GET", "/latest/user-data", &[]).1, "aws-user-data");
    assert_eq!(refused_by("GET", "/latest/dynamic/instance-identity/pkcs7", &[]).1, "aws-signed-identity");
    assert_eq!(refused_by("GET", "/latest/dynamic/instance-identity/rsa2048", &[]).1, "aws-signed-identity");
    assert_eq!(refused_by("GET", "/latest/meta-data/public-keys/0/openssh-key", &[]).1, "default-deny");
    assert_eq!(refused_by("GET", "/latest/api/token", &[]).1, "default-deny", "the token is PUT only");
    assert_eq!(refused_by("PUT", "/latest/meta-data/instance-id", &[]).1, "default-deny");
    assert_eq!(refused_by("POST", "/latest/meta-data/instance-id", &[]).1, "default-deny");
    assert_eq!(refused_by("GET", "/latest/meta-data/placement/region?x=1", &[]).1, "aws-query");
}

#[test]
fn path_tricks_reach_the_rule_of_the_real_path() {
    for target in [
        "/latest/meta-data/placement/../iam/security-credentials/",
        "/latest/meta-data/placement/%2e%2e/iam/info",
        "/latest/meta-data/placement/%2E%2E/iam/info",
        "/latest//meta-data//iam//info",
        "/latest/meta-data/%69am/info",
        "/latest/meta-data/./iam/info",
        "/latest/meta-data/iam/info/",
        "/latest/./meta-data/placement/./../iam",
    ] {
        assert_eq!(refused_by("GET", target, &[]).1, "aws-iam-credentials", "{target}");
    }
    assert_eq!(refused_by("GET", "/latest/meta-data/IAM/info", &[]).1, "default-deny", "AWS paths are case-sensitive");
    assert_eq!(refused_by("GET", "/latest/meta-data/placement%2f..%2fiam", &[]).1, "bad-path");
}

#[test]
fn gcp_requires_the_flavor_header_and_hides_accounts_and_attributes() {
    assert!(passes("GET", "/computeMetadata/v1/project/project-id", GOOGLE));
    assert!(passes("GET", "/computeMetadata/v1/instance/zone", GOOGLE));
    assert!(passes("GET", "/computeMetadata/v1/instance/network-interfaces/0/ip", GOOGLE));
    assert!(passes("GET", "/computeMetadata/v1/instance/network-interfaces/?recursive=true&alt=json", GOOGLE));
    assert!(passes("GET", "/", GOOGLE), "google-auth's GCE ping");
    assert_eq!(refused_by("GET", "/computeMetadata/v1/instance/zone", &[]), (403, "gcp-header".into()));
    assert_eq!(refused_by("GET", "/computeMetadata/v1/instance/zone", &[("Metadata-Flavor", "Amazon")]).0, 403);
    assert_eq!(
        refused_by("GET", "/computeMetadata/v1/instance/service-accounts/default/token", GOOGLE),
        (404, "gcp-service-accounts".into())
    );
    assert_eq!(
        refused_by("GET", "/computeMetadata/v1/instance/attributes/kube-env", GOOGLE).1,
        "gcp-instance-attributes"
    );
    assert_eq!(
        refused_by("GET", "/computeMetadata/v1/project/attributes/ssh-keys", GOOGLE).1,
        "gcp-project-attributes"
    );
    assert_eq!(refused_by("GET", "/computeMetadata/v1/instance/?recursive=true", GOOGLE).1, "gcp-recursive");
    assert_eq!(refused_by("GET", "/computeMetadata/v1/instance/?recursive=True", GOOGLE).1, "gcp-recursive");
    assert!(passes("GET", "/computeMetadata/v1/instance/?recursive=false", GOOGLE));
    assert_eq!(refused_by("GET", "/computemetadata/v1/instance/zone", GOOGLE).1, "default-deny");
    assert_eq!(refused_by("GET", "/0.1/meta-data/service-accounts", GOOGLE).1, "default-deny");
}

#[test]
fn azure_requires_metadata_true_ignores_case_and_hides_identity() {
    assert!(passes("GET", "/metadata/instance/compute/location?api-version=2021-02-01&format=text", AZURE));
    assert!(passes("GET", "/Metadata/Instance/Compute/vmId?api-version=2021-02-01", AZURE));
    assert!(passes("GET", "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress", AZURE));
    assert_eq!(refused_by("GET", "/metadata/instance/compute/location", &[]), (400, "azure-header".into()));
    assert_eq!(
        refused_by("GET", "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x", AZURE).1,
        "azure-query"
    );
    assert_eq!(
        refused_by("GET", "/metadata/identity/oauth2/token?api-version=2018-02-01", AZURE),
        (400, "azure-identity".into())
    );
    assert_eq!(refused_by("GET", "/METADATA/IDENTITY/oauth2/token", AZURE).1, "azure-identity");
    assert_eq!(refused_by("GET", "/metadata/attested/document", AZURE).1, "azure-attested");
    assert_eq!(refused_by("GET", "/metadata/instance/compute/userData", AZURE).1, "azure-user-data");
    assert_eq!(refused_by("GET", "/metadata/instance", AZURE).1, "default-deny");
}

#[test]
fn unknown_trees_and_odd_roots_are_refused() {
    assert_eq!(refused_by("GET", "/openstack/latest/meta_data.json", &[]).1, "default-deny");
    assert_eq!(refused_by("GET", "/?x", &[]).1, "root-listing");
    assert_eq!(refused_by("DELETE", "/", &[]).1, "root-listing");
}

#[test]
fn a_pods_extra_paths_open_exactly_those_paths() {
    let extra: ExtraPaths = serde_norway::from_str(
        "{namespace: monitoring, pod: 'agent-*', paths: ['/latest/meta-data/iam/info', '/computeMetadata/v1/instance/attributes/**']}",
    )
    .unwrap();
    let with = |m, t, h| judge(m, t, h, &[&extra]);
    assert!(matches!(with("GET", "/latest/meta-data/iam/info", &[]), Decision::Pass { class: "extra", .. }));
    assert!(matches!(with("GET", "/latest/meta-data/iam/security-credentials/", &[]), Decision::Refuse { .. }));
    assert!(matches!(with("PUT", "/latest/meta-data/iam/info", &[]), Decision::Refuse { .. }));
    assert!(matches!(
        with("GET", "/computeMetadata/v1/instance/attributes/?recursive=true", GOOGLE),
        Decision::Pass { .. }
    ));
    assert!(matches!(
        with("GET", "/computeMetadata/v1/instance/attributes/kube-env", &[]),
        Decision::Refuse { status: 403, .. }
    ));
    assert_eq!(extra.rule_name(), "extra:monitoring/agent-*");
}
