//! `serve`: picks the mode (embedded with --manifests, else Kubernetes) in one place.

use crate::cli::ServeArgs;
use crate::errors::usage;

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let Some(manifests) = args.manifests.clone() else {
        // Checked before logging starts, so a mistaken invocation is one line.
        if !crate::kubeconfig::present() {
            return Err(crate::kubeconfig::missing(
                "pass --manifests DIR for embedded mode",
            ));
        }
        crate::logging::init(args.log_format, &args.log_level);
        return crate::kubernetes::serve(args).await;
    };
    if !manifests.is_dir() {
        return Err(usage(format!(
            "--manifests {} is not a directory; pass the folder holding the Pipeline and Secret manifests",
            manifests.display()
        )));
    }
    crate::logging::init(args.log_format, &args.log_level);
    crate::embedded::serve(args, &manifests).await
}
