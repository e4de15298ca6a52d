// SPDX-License-Identifier: Apache-2.0
//! `AssumeRoleWithWebIdentity`, as plain data: the query-API request and the XML
//! answer. The call is unsigned: the web identity token is the credential.

use std::time::{Duration, SystemTime};

/// STS's API version of the query API.
pub(crate) const API_VERSION: &str = "2011-06-15";

/// One exchange of a pod's token for its role's credentials.
pub(crate) struct AssumeRequest<'a> {
    pub role_arn: &'a str,
    pub session_name: &'a str,
    pub token: &'a str,
    pub duration: Duration,
}

impl AssumeRequest<'_> {
    /// The `application/x-www-form-urlencoded` body of the POST.
    pub(crate) fn form(&self) -> String {
        let pairs = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", API_VERSION),
            ("RoleArn", self.role_arn),
            ("RoleSessionName", self.session_name),
            ("WebIdentityToken", self.token),
        ];
        let mut out: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={}", form_escape(v))).collect();
        out.push(format!("DurationSeconds={}", self.duration.as_secs()));
        out.join("&")
    }
}

/// Percent-encodes all but the unreserved characters.
pub(crate) fn form_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Credentials STS issued for a pod.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Issued {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    /// The role's unique id (`AROA…`), from the assumed role's id.
    pub role_id: Option<String>,
    /// The assumed role's session ARN.
    pub assumed_arn: Option<String>,
    /// When STS answered.
    pub issued_at: SystemTime,
}

impl std::fmt::Debug for Issued {
    /// Names the key id and expiry; the secret and the token stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &humantime::format_rfc3339_seconds(self.expiration))
            .finish_non_exhaustive()
    }
}

/// Why no credentials came: STS's own error, or none at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct StsFailure {
    /// STS's error code (`InvalidIdentityToken`, `AccessDenied`, …), or ours:
    /// `STSUnreachable`, `STSInvalidResponse`, `RegionUnknown`.
    pub code: String,
    pub message: String,
}

impl StsFailure {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> StsFailure {
        StsFailure { code: code.to_owned(), message: message.into() }
    }
}

/// Reads STS's answer (`status`, XML `body`) to an `AssumeRoleWithWebIdentity`.
pub(crate) fn parse_response(status: u16, body: &str, now: SystemTime) -> Result<Issued, StsFailure> {
    if let Some(error) = element(body, "Error") {
        let code = element(error, "Code").map_or_else(|| format!("HTTP{status}"), unescape);
        let message = element(error, "Message").map(unescape).unwrap_or_default();
        return Err(StsFailure { code, message });
    }
    let invalid = |why: &str| StsFailure::new("STSInvalidResponse", format!("STS answered HTTP {status}: {why}"));
    if status != 200 {
        return Err(invalid("not 200 and no STS error in the body"));
    }
    let creds = element(body, "Credentials").ok_or_else(|| invalid("no <Credentials>"))?;
    let field = |name: &str| element(creds, name).map(unescape).ok_or_else(|| invalid(&format!("no <{name}>")));
    let expiration = field("Expiration")?;
    let expiration = humantime::parse_rfc3339_weak(&expiration)
        .map_err(|e| invalid(&format!("<Expiration> {expiration:?}: {e}")))?;
    let user = element(body, "AssumedRoleUser");
    let role_id = user
        .and_then(|u| element(u, "AssumedRoleId"))
        .map(unescape)
        .map(|id| id.split(':').next().unwrap_or_default().to_owned());
    Ok(Issued {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: field("SecretAccessKey")?,
        session_token: field("SessionToken")?,
        expiration,
        role_id,
        assumed_arn: user.and_then(|u| element(u, "Arn")).map(unescape),
        issued_at: now,
    })
}

/// The text between `<name>` (or `<name attrs>`) and `</name>`: STS's answers are flat
/// enough that the first such element is the one meant.
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    loop {
        let at = from + xml[from..].find(&format!("<{name}"))?;
        let after = &xml[at + 1 + name.len()..];
        let rest =
            after.strip_prefix('>').or_else(|| after.strip_prefix(' ').and_then(|r| r.find('>').map(|i| &r[i + 1..])));
        if let Some(rest) = rest {
            let end = rest.find(&format!("</{name}>"))?;
            return Some(&rest[..end]);
        }
        from = at + 1;
    }
}

fn unescape(text: &str) -> String {
    text.trim()
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#xA;", "\n")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    const OK: &str = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIARTX3GSDSUUIPOEAO</AccessKeyId><SecretAccessKey>17Mj26HRvb+o5sW</SecretAccessKey><SessionToken>FQoGZ&amp;XIv=</SessionToken><Expiration>2026-12-07T01:29:30.623675Z</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROA3X42LBCDQYELV8JSF:shop.web-1</AssumedRoleId><Arn>arn:aws:sts::111122223333:assumed-role/payments-api/shop.web-1</Arn></AssumedRoleUser><Audience>sts.amazonaws.com</Audience></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"#;

    #[test]
    fn stss_answer_gives_the_credentials_and_the_roles_id() {
        let issued = parse_response(200, OK, UNIX_EPOCH).unwrap();
        assert_eq!(issued.access_key_id, "ASIARTX3GSDSUUIPOEAO");
        assert_eq!(issued.secret_access_key, "17Mj26HRvb+o5sW");
        assert_eq!(issued.session_token, "FQoGZ&XIv=");
        assert_eq!(humantime::format_rfc3339_seconds(issued.expiration).to_string(), "2026-12-07T01:29:30Z");
        assert_eq!(issued.role_id.as_deref(), Some("AROA3X42LBCDQYELV8JSF"));
        assert!(issued.assumed_arn.unwrap().ends_with("assumed-role/payments-api/shop.web-1"));
        let debug = format!("{:?}", parse_response(200, OK, UNIX_EPOCH).unwrap());
        assert!(!debug.contains("17Mj26") && !debug.contains("FQoGZ"), "{debug}");
    }

    #[test]
    fn stss_errors_keep_their_code_and_message() {
        let body = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Incorrect token audience &amp; more</Message></Error><RequestId>x</RequestId></ErrorResponse>"#;
        let failure = parse_response(400, body, UNIX_EPOCH).unwrap_err();
        assert_eq!(
            (failure.code.as_str(), failure.message.as_str()),
            ("InvalidIdentityToken", "Incorrect token audience & more")
        );
        let html = parse_response(500, "<html>Internal Server Error</html>", UNIX_EPOCH).unwrap_err();
        assert_eq!(html.code, "STSInvalidResponse");
        let partial =
            parse_response(200, "<Credentials><AccessKeyId>A</AccessKeyId></Credentials>", UNIX_EPOCH).unwrap_err();
        assert!(
            partial.message.contains("no <SecretAccessKey>") || partial.message.contains("no <Expiration>"),
            "{partial}"
        );
    }

    #[test]
    fn the_request_is_form_encoded_with_every_parameter() {
        let req = AssumeRequest {
            role_arn: "arn:aws:iam::111122223333:role/x",
            session_name: "shop.web-1",
            token: "a.b+c/=",
            duration: Duration::from_secs(3600),
        };
        assert_eq!(
            req.form(),
            "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A111122223333%3Arole%2Fx\
             &RoleSessionName=shop.web-1&WebIdentityToken=a.b%2Bc%2F%3D&DurationSeconds=3600"
        );
    }
}
