//! The deploy files, checked for what a container build or a cluster would
//! otherwise find out late (no Dockerfile linter or Kubernetes is available
//! here): images run as a non-root user that owns the data directory, have
//! a health check and labels, and build from a context without build
//! outputs; manifests run that user with an `fsGroup`, pin the image, and
//! limit memory.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The instructions of a Dockerfile's last stage, continuation lines joined.
fn final_stage(dockerfile: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    let lines: Vec<String> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let from = lines.iter().rposition(|l| l.starts_with("FROM ")).expect("a FROM");
    lines[from..].to_vec()
}

#[test]
fn images_run_unprivileged_with_an_owned_data_directory_and_a_health_check() {
    for file in ["deploy/Dockerfile", "deploy/Dockerfile.cuda"] {
        let stage = final_stage(&read(file));
        let base = &stage[0];
        assert!(
            !base.ends_with(":latest") && base.contains(':'),
            "{file}: pin the base image: {base}"
        );
        let user = stage
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER: the server would run as root"));
        let uid = user.split(':').next().unwrap_or_default().trim();
        assert!(uid != "0" && uid != "root", "{file}: runs as root");
        let data_dir = stage
            .iter()
            .find_map(|l| {
                l.strip_prefix("ENV ")
                    .and_then(|env| env.split("HEARTH_DATA_DIR=").nth(1))
            })
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{file}: HEARTH_DATA_DIR is not set"));
        assert!(
            stage
                .iter()
                .any(|l| l.starts_with("RUN ") && l.contains(&format!("chown {uid}")) && l.contains(data_dir)),
            "{file}: {data_dir} must be created and owned by {uid}"
        );
        assert!(
            stage.iter().any(|l| l.starts_with("HEALTHCHECK ")),
            "{file}: no HEALTHCHECK"
        );
        assert!(
            stage
                .iter()
                .any(|l| l.starts_with("LABEL ") && l.contains("org.opencontainers.image.title")),
            "{file}: no OCI labels"
        );
        assert!(stage.iter().any(|l| l.starts_with("VOLUME ") && l.contains(data_dir)));
    }
    let cuda = read("deploy/Dockerfile.cuda");
    assert!(
        cuda.contains("--features cuda"),
        "the CUDA image builds the cuda feature"
    );
    let ignore = read(".dockerignore");
    for output in ["target/", "**/target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == output),
            ".dockerignore lacks {output}"
        );
    }
}

#[test]
fn manifests_run_the_images_user_with_a_pinned_image_and_limits() {
    for file in ["deploy/kubernetes/hearth.yaml", "deploy/kubernetes/cluster.yaml"] {
        let text = read(file);
        assert!(
            text.contains("fsGroup: 10001"),
            "{file}: a fresh volume must be writable by uid 10001"
        );
        assert!(text.contains("runAsNonRoot: true"), "{file}: runAsNonRoot");
        for image in text.lines().filter_map(|l| l.trim().strip_prefix("image: ")) {
            let image = image.split('#').next().unwrap_or_default().trim();
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{file}: pin the image: {image}"
            );
        }
        assert!(text.contains("limits: { memory:"), "{file}: no memory limit");
        assert!(
            text.contains("readinessProbe") && text.contains("/readyz"),
            "{file}: readiness"
        );
        assert!(
            text.contains("livenessProbe") && text.contains("/healthz"),
            "{file}: liveness"
        );
    }
    let cluster = read("deploy/kubernetes/cluster.yaml");
    assert!(
        cluster.contains("kind: StatefulSet") && cluster.contains("volumeClaimTemplates"),
        "each cluster node needs a volume of its own for its usage spool"
    );
}
