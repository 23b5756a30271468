//! Names, asset paths and outbound origins, the inputs that reach the
//! filesystem or the network: validation never panics, and what it accepts
//! cannot escape (no separators in names, no `..` or empty parts in paths,
//! no credentials in origins).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if hearth_manifest::validate_name(text).is_ok() {
        assert!(!text.is_empty() && text.len() <= 63);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
    if hearth_manifest::validate_target(text).is_ok() {
        assert!(text.starts_with('/'));
        assert!(
            text[1..]
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
        );
        assert!(!text.contains('\0') && !text.contains('\\'));
    }
    if let Ok(origin) = hearth_manifest::Origin::parse(text) {
        assert!(!origin.host.is_empty() && !origin.host.contains('@') && !origin.host.contains('/'));
        let uri: http::Uri = format!(
            "{}://{}:{}/x",
            if origin.https { "https" } else { "http" },
            origin.host,
            origin.port
        )
        .parse()
        .expect("an accepted origin forms a URL");
        assert!(origin.matches(&uri));
    }
});
