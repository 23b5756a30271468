//! The client verbs: `deploy`, `invoke`, `functions`, `status`. Each is a thin layer
//! over the `hearth-client` SDK that formats results for a terminal.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use hearth_client::{Client, ClientError, FunctionVersion, Invocation, Project, StartUp};

use crate::ClientArgs;

fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    Ok(Client::new(&args.server, args.token.clone(), &args.tenant)?)
}

/// Output format of listing commands.
#[derive(Debug, Clone, Copy, Default, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Text,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, clap::Subcommand)]
pub enum FunctionsCommand {
    /// List functions with their newest version.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show a function: manifest and every version.
    Show {
        /// Function name.
        name: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// List every live version of a function, oldest first.
    Versions {
        /// Function name.
        name: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a function (running invocations finish; later ones get 404),
    /// or one version of it.
    #[command(disable_version_flag = true)]
    Delete {
        /// Function name.
        name: String,
        /// Delete only this version (refused while an alias points at it).
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum AliasCommand {
    /// Point an alias at one version, or split it over several by weight:
    /// `hearth alias set NAME prod 3`, `hearth alias set NAME prod --split
    /// 3=90,4=10`. `latest` is the bare name: setting it pins it.
    Set {
        /// Function name.
        name: String,
        /// Alias (not all digits: `@3` names version 3).
        alias: String,
        /// The one version it points at.
        #[arg(value_name = "VERSION", required_unless_present = "split", conflicts_with = "split")]
        to: Option<u32>,
        /// Versions and weights, `VERSION=WEIGHT,...`.
        #[arg(long, value_parser = parse_split)]
        split: Option<Split>,
        /// Mirror a share of the alias's requests to a version,
        /// `VERSION=PERCENT` (its answers are recorded, never sent).
        #[arg(long, value_parser = parse_shadow)]
        shadow: Option<hearth_client::AliasShadow>,
    },
    /// Unset an alias (`latest` follows the newest version again).
    Unset {
        /// Function name.
        name: String,
        /// Alias.
        alias: String,
    },
    /// List a function's aliases.
    List {
        /// Function name.
        name: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Show an alias's changes, oldest first (deploys that `latest`
    /// followed included).
    History {
        /// Function name.
        name: String,
        /// Alias.
        #[arg(default_value = "latest")]
        alias: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

/// `--split 3=90,4=10`: versions and their weights.
#[derive(Debug, Clone)]
pub struct Split(Vec<hearth_client::AliasRoute>);

/// Parses `3=90,4=10`.
fn parse_split(text: &str) -> Result<Split, String> {
    text.split(',')
        .map(|part| {
            let (version, weight) = parse_pair(part, "WEIGHT")?;
            Ok(hearth_client::AliasRoute { version, weight })
        })
        .collect::<Result<_, String>>()
        .map(Split)
}

/// Parses `5=10`.
fn parse_shadow(text: &str) -> Result<hearth_client::AliasShadow, String> {
    let (version, percent) = parse_pair(text, "PERCENT")?;
    Ok(hearth_client::AliasShadow { version, percent })
}

fn parse_pair(part: &str, what: &str) -> Result<(u32, u32), String> {
    let (version, value) = part
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("`{part}`: expected VERSION={what}"))?;
    let number = |text: &str| text.trim().parse::<u32>().map_err(|e| format!("`{part}`: {e}"));
    Ok((number(version)?, number(value)?))
}

#[derive(Debug, clap::Subcommand)]
pub enum TokensCommand {
    /// Create a token; prints it once, with its id (keep both).
    Create {
        /// Tenant the token acts for (created if new; the operator's token only).
        #[arg(long)]
        tenant: Option<String>,
        /// What it may do: admin (everything in its tenant), deployer (deploy,
        /// list, delete), invoker (invoke), billing (read usage).
        #[arg(long, value_parser = ["admin", "deployer", "invoker", "billing"])]
        role: String,
        /// Lifetime, like 30d, 12h or 90m (never expires without it).
        #[arg(long)]
        expires: Option<String>,
        /// Output format (json: id and token for scripts).
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// List the tenant's tokens (never their secrets).
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token by its id (tok_...) or by the token itself; effective
    /// on its next request.
    Revoke {
        /// The token's id, or the token.
        id_or_token: String,
    },
}

/// Which usage records a `hearth usage` command covers.
#[derive(Debug, clap::Args)]
pub struct UsageFilter {
    /// From this time (RFC 3339, or YYYY-MM-DD for UTC midnight), inclusive.
    #[arg(long)]
    since: Option<String>,
    /// Until this time, exclusive.
    #[arg(long)]
    until: Option<String>,
    /// Only this function.
    #[arg(long)]
    function: Option<String>,
}

impl From<UsageFilter> for hearth_client::UsageQuery {
    fn from(filter: UsageFilter) -> Self {
        hearth_client::UsageQuery {
            since: filter.since,
            until: filter.until,
            function: filter.function,
            ..hearth_client::UsageQuery::default()
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum UsageCommand {
    /// Stream usage records to a file (or stdout), oldest first.
    Export {
        #[command(flatten)]
        filter: UsageFilter,
        /// Record format.
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Write here instead of stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Only records committed after this cursor (the `next cursor` an
        /// earlier export printed): follow the log without gaps or repeats.
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
    },
    /// Totals per function version and UTC day (shadow copies apart): the
    /// versions behind an alias side by side.
    Summary {
        #[command(flatten)]
        filter: UsageFilter,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
}

/// Usage export formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
    /// One CloudEvents 1.0 JSON event per line (id = record id, subject = tenant).
    Cloudevents,
}

#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// Function name.
    function: String,
    /// Request body: text, or `@FILE` to send a file (`@-` reads stdin).
    #[arg(long, short)]
    data: Option<String>,
    /// Request header `NAME:VALUE`; repeatable.
    #[arg(long = "header", short = 'H', value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// HTTP method; POST when --data is given, else GET.
    #[arg(long, short = 'X')]
    method: Option<String>,
    /// Path below the function's mount, with query.
    #[arg(long, default_value = "/")]
    path: String,
    /// Print the status line and response headers before the body.
    #[arg(long, short)]
    include: bool,
    /// Run asynchronously: print the invocation id at once; the function
    /// runs at the `batch` class when capacity allows.
    #[arg(long = "async", conflicts_with = "result")]
    asynchronous: bool,
    /// Print the stored response of the asynchronous invocation ID (exit
    /// status 2 while it has not finished, unless --wait).
    #[arg(long, value_name = "ID")]
    result: Option<String>,
    /// With --result: wait until the invocation finishes.
    #[arg(long, requires = "result")]
    wait: bool,
    #[command(flatten)]
    client: ClientArgs,
}

pub async fn deploy(args: &ClientArgs, path: &Path, no_build: bool) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    let project = Project::load(path)?;
    if !no_build && let Some(build) = &project.manifest().build {
        eprintln!("building: {build}");
        let project = project.clone();
        tokio::task::spawn_blocking(move || project.build())
            .await
            .context("build task failed")??;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = bar.clone();
    let result = client
        .deploy(&project, move |sent, total| {
            progress.set_length(total);
            progress.set_position(sent);
            // Uploaded: the server compiles and checks it now (seconds for
            // a large component, such as a Python handler's interpreter).
            if sent >= total && progress.message().is_empty() {
                progress.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                progress.set_message("uploaded; compiling and checking");
                progress.enable_steady_tick(std::time::Duration::from_millis(100));
            }
        })
        .await;
    bar.finish_and_clear();
    let version = result?;
    println!(
        "deployed {} v{} ({}, {})",
        version.name,
        version.version,
        short_digest(&version.component),
        human_bytes(version.component_size)
    );
    for (kind, artifacts) in [("model", &version.models), ("file", &version.files)] {
        for a in artifacts {
            println!(
                "  {kind} {} ({}, {})",
                a.name,
                short_digest(&a.digest),
                human_bytes(a.size)
            );
        }
    }
    match &version.start_up {
        Some(StartUp::Snapshot) => println!("  start-up: pre-initialised (fresh instances start from a snapshot)"),
        Some(StartUp::Plain { reason }) => println!("  start-up: not pre-initialised: {reason}"),
        None => {}
    }
    println!("invoke: {}{}", client.server(), version.invoke_path);
    Ok(ExitCode::SUCCESS)
}

pub async fn invoke(args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let client = connect(&args.client)?;
    if let Some(id) = &args.result {
        return async_result(&client, &args.function, id, args.wait, args.include).await;
    }
    let body = match args.data.as_deref() {
        None => Vec::new(),
        Some("@-") => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
            buf
        }
        Some(data) => match data.strip_prefix('@') {
            Some(file) => std::fs::read(file).map_err(|source| ClientError::Io {
                path: PathBuf::from(file),
                source,
            })?,
            None => data.as_bytes().to_vec(),
        },
    };
    let method = match &args.method {
        Some(m) => m
            .to_uppercase()
            .parse()
            .with_context(|| format!("invalid method `{m}`"))?,
        None if args.data.is_some() => reqwest::Method::POST,
        None => reqwest::Method::GET,
    };
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .with_context(|| format!("header `{h}` must be NAME:VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let invocation = Invocation {
        method,
        path: args.path.clone(),
        headers,
        body: body.into(),
    };
    if args.asynchronous {
        let accepted = client.submit(&args.function, invocation).await?;
        println!("{}", accepted.id);
        eprintln!(
            "queued; fetch the result with: hearth invoke {} --result {} --wait",
            args.function, accepted.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    let response = client.invoke(&args.function, invocation).await?;
    let status = response.status();
    let mut stdout = std::io::stdout().lock();
    if args.include {
        writeln!(stdout, "{:?} {status}", response.version())?;
        for (name, value) in response.headers() {
            writeln!(stdout, "{name}: {}", String::from_utf8_lossy(value.as_bytes()))?;
        }
        writeln!(stdout)?;
    }
    if status.is_success() {
        let bytes = response.bytes().await.context("reading the response")?;
        stdout.write_all(&bytes)?;
        stdout.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let problem = hearth_client::problem_of(response).await;
    if args.include {
        writeln!(stdout, "{}", serde_json::to_string_pretty(&problem)?)?;
    }
    eprintln!("error: {problem}");
    Ok(ExitCode::FAILURE)
}

/// `hearth invoke F --result ID`: prints a stored asynchronous response.
async fn async_result(
    client: &Client,
    function: &str,
    id: &str,
    wait: bool,
    include: bool,
) -> anyhow::Result<ExitCode> {
    let mut poll = std::time::Duration::from_millis(100);
    let invocation = loop {
        let invocation = client.async_invocation(function, id).await?;
        if invocation.is_finished() {
            break invocation;
        }
        if !wait {
            eprintln!(
                "invocation {id} is {} (attempts: {})",
                invocation.state, invocation.attempts
            );
            return Ok(ExitCode::from(2));
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(std::time::Duration::from_secs(2));
    };
    let Some(response) = invocation.response else {
        anyhow::bail!("invocation {id} finished without a stored response");
    };
    let body = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &response.body_base64)
        .context("decoding the stored body")?;
    let mut stdout = std::io::stdout().lock();
    if include {
        writeln!(stdout, "{} ({})", response.status, invocation.state)?;
        for (name, value) in &response.headers {
            writeln!(stdout, "{name}: {value}")?;
        }
        writeln!(stdout)?;
    }
    stdout.write_all(&body)?;
    stdout.flush()?;
    Ok(if (200..300).contains(&response.status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn tokens(args: &ClientArgs, command: TokensCommand) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    match command {
        TokensCommand::Create {
            tenant,
            role,
            expires,
            output,
        } => {
            let created = client
                .create_token(tenant.as_deref(), &role, expires.as_deref())
                .await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&created)?),
                Output::Text => {
                    println!("{}", created.token.as_deref().unwrap_or_default());
                    eprintln!(
                        "created {} ({} in `{}`{}); the token above is shown once",
                        created.id,
                        created.role,
                        created.tenant,
                        created
                            .expires_at
                            .as_deref()
                            .map(|at| format!(", expires {at}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        TokensCommand::List { output } => {
            let tokens = client.list_tokens().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&tokens)?),
                Output::Text => {
                    println!("{:<36}  {:<9} {:<24} {:<24} state", "id", "role", "created", "expires");
                    for t in tokens {
                        let state = if t.revoked_at.is_some() {
                            "revoked"
                        } else if t.operator {
                            "operator"
                        } else {
                            "active"
                        };
                        println!(
                            "{:<36}  {:<9} {:<24} {:<24} {state}",
                            t.id,
                            t.role,
                            t.created_at,
                            t.expires_at.as_deref().unwrap_or("never")
                        );
                    }
                }
            }
        }
        TokensCommand::Revoke { id_or_token } => {
            let revoked = client.revoke_token(&id_or_token).await?;
            println!("revoked {}", revoked.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(args: &ClientArgs, command: UsageCommand) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    match command {
        UsageCommand::Export {
            filter,
            format,
            output,
            after,
        } => {
            let query = hearth_client::UsageQuery {
                cursor: after,
                ..filter.into()
            };
            let format = match format {
                ExportFormat::Csv => "csv",
                ExportFormat::Jsonl => "jsonl",
                ExportFormat::Cloudevents => "cloudevents",
            };
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("exporting {bytes} {bytes_per_sec}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            let progress = bar.clone();
            let exported = match &output {
                Some(path) => {
                    let mut file = tokio::fs::File::create(path)
                        .await
                        .with_context(|| format!("creating {}", path.display()))?;
                    client
                        .usage_export(&query, format, &mut file, move |n| progress.set_position(n))
                        .await?
                }
                None => {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                    let mut stdout = tokio::io::stdout();
                    client.usage_export(&query, format, &mut stdout, |_| {}).await?
                }
            };
            bar.finish_and_clear();
            if let Some(path) = output {
                eprintln!("wrote {} to {}", human_bytes(exported.bytes), path.display());
            }
            if let Some(cursor) = exported.next_cursor {
                eprintln!("next cursor: {cursor} (continue with --after {cursor})");
            }
        }
        UsageCommand::Summary { filter, output } => {
            let rows = client.usage_summary(&filter.into()).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Text if rows.is_empty() => eprintln!("no usage in tenant `{}`", args.tenant),
                Output::Text => {
                    println!(
                        "{:<10}  {:<24} {:>9} {:>8} {:>6} {:>6} {:>9} {:>10} {:>10}  cost",
                        "day",
                        "function@version",
                        "calls",
                        "rejected",
                        "5xx",
                        "cold",
                        "mean ms",
                        "billed ms",
                        "compute ms"
                    );
                    for r in rows {
                        let shadow = if r.shadow { " (shadow)" } else { "" };
                        println!(
                            "{:<10}  {:<24} {:>9} {:>8} {:>6} {:>6} {:>9.2} {:>10} {:>10.1}  {} {}",
                            r.day,
                            format!("{}@{}{shadow}", r.function, r.version),
                            r.invocations,
                            r.rejected,
                            r.errors,
                            r.cold_starts,
                            r.mean_wall_ms,
                            r.billed_ms,
                            r.compute_ms,
                            r.cost,
                            r.currency
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn functions(args: &ClientArgs, command: FunctionsCommand) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    match command {
        FunctionsCommand::List { output } => {
            let functions = client.list().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&functions)?),
                Output::Text if functions.is_empty() => eprintln!("no functions in tenant `{}`", args.tenant),
                Output::Text => print_table(&functions),
            }
        }
        FunctionsCommand::Show { name, output } => {
            let detail = client.show(&name).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&detail)?),
                Output::Text => {
                    let f = &detail.function;
                    println!("function  {}/{}", f.tenant, f.name);
                    println!("version   {}", f.version);
                    println!("invoke    {}{}", client.server(), f.invoke_path);
                    println!("manifest  {}", serde_json::to_string(&detail.manifest)?);
                    println!("versions:");
                    print_table(&detail.versions);
                }
            }
        }
        FunctionsCommand::Versions { name, output } => {
            let versions = client.versions(&name).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&versions)?),
                Output::Text => print_table(&versions),
            }
        }
        FunctionsCommand::Delete { name, version: None } => {
            client.delete(&name).await?;
            println!("deleted {name}");
        }
        FunctionsCommand::Delete {
            name,
            version: Some(version),
        } => {
            client.delete_version(&name, version).await?;
            println!("deleted {name}@{version}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn alias(args: &ClientArgs, command: AliasCommand) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    match command {
        AliasCommand::Set {
            name,
            alias,
            to,
            split,
            shadow,
        } => {
            let routes = match (to, split) {
                (Some(version), _) => vec![hearth_client::AliasRoute { version, weight: 1 }],
                (None, Some(Split(split))) => split,
                (None, None) => anyhow::bail!("give a VERSION or --split"),
            };
            let set = client
                .set_alias(&name, &alias, &hearth_client::SetAlias { routes, shadow })
                .await?;
            println!("{name}@{alias} -> {}", describe(&set));
        }
        AliasCommand::Unset { name, alias } => {
            client.unset_alias(&name, &alias).await?;
            println!("unset {name}@{alias}");
        }
        AliasCommand::List { name, output } => {
            let aliases = client.aliases(&name).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&aliases)?),
                Output::Text => {
                    println!("{:<16} {:<32} SET AT", "ALIAS", "TARGET");
                    for alias in &aliases {
                        println!("{:<16} {:<32} {}", alias.alias, describe(alias), alias.set_at);
                    }
                }
            }
        }
        AliasCommand::History { name, alias, output } => {
            let changes = client.alias_history(&name, &alias).await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&changes)?),
                Output::Text => {
                    println!("{:<26} TARGET", "AT");
                    for change in &changes {
                        println!("{:<26} {}", change.set_at, describe(change));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rollback(args: &ClientArgs, name: &str, alias: &str) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    let back = client.rollback(name, alias).await?;
    println!("{name}@{alias} -> {}", describe(&back));
    Ok(ExitCode::SUCCESS)
}

/// `3`, `3=90,4=10`, `newest (4)`, `3 + shadow 5=10%`, `unset`.
fn describe(alias: &hearth_client::AliasInfo) -> String {
    let mut text = match alias.routes.as_slice() {
        [] => "unset".to_owned(),
        [only] if alias.follows_newest => format!("newest ({})", only.version),
        [only] => only.version.to_string(),
        routes => routes
            .iter()
            .map(|r| format!("{}={}", r.version, r.weight))
            .collect::<Vec<_>>()
            .join(","),
    };
    if let Some(shadow) = alias.shadow {
        text.push_str(&format!(" + shadow {}={}%", shadow.version, shadow.percent));
    }
    text
}

pub async fn status(args: &ClientArgs, output: Output) -> anyhow::Result<ExitCode> {
    let client = connect(args)?;
    let status = client.status().await?;
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("devices:");
    for d in &status.devices {
        let detail = match (&d.name, d.total_bytes) {
            (Some(name), Some(total)) => format!("{name}, {}", human_bytes(total)),
            _ => String::new(),
        };
        println!("  {:<8} {detail}", d.id);
    }
    if status.nodes.len() > 1 {
        println!("nodes:");
        for n in &status.nodes {
            let warm = n.details["warm_models"].as_array().map_or(0, Vec::len);
            let devices: Vec<&str> = n.details["devices"]
                .as_array()
                .map(|all| all.iter().filter_map(|d| d["id"].as_str()).collect())
                .unwrap_or_default();
            println!(
                "  {:<44} {:<24} heartbeat {}  devices {}  warm models {warm}",
                n.id,
                n.url,
                n.heartbeat_at,
                devices.join(",")
            );
        }
    }
    println!(
        "warm models ({} loads, {} revivals from the cold tier since start; {} cold now):",
        status.model_loads,
        status.model_revivals,
        human_bytes(status.cold_model_bytes)
    );
    if status.models.is_empty() {
        println!("  none");
    }
    for m in &status.models {
        let mean = if m.runs == 0 {
            0.0
        } else {
            m.calls as f64 / m.runs as f64
        };
        println!(
            "  {:<19}  {:<7} {:>9}  {} in use  {} calls in {} runs (mean batch {mean:.1})",
            short_digest(&m.digest),
            m.device,
            human_bytes(m.size),
            m.users,
            m.calls,
            m.runs
        );
    }
    println!("functions in `{}`:", status.tenant);
    for f in &status.functions {
        let models: Vec<String> = f
            .models
            .iter()
            .map(|m| {
                format!(
                    "{} ({}{})",
                    m.name,
                    short_digest(&m.digest),
                    if m.warm { ", warm" } else { "" }
                )
            })
            .collect();
        let models = if models.is_empty() {
            "no models".to_owned()
        } else {
            models.join(", ")
        };
        let i = &f.instances;
        let queued: usize = i.queued.values().sum();
        println!("  {} v{}: {models}", f.name, f.version);
        println!(
            "    instances: {} busy, {} idle, {queued} queued; {} cold / {} warm starts, {} scale-downs, {} rejected{}",
            i.busy,
            i.idle,
            i.cold_starts,
            i.warm_starts,
            i.scale_downs,
            i.rejected,
            if i.loaded { "" } else { "; scaled to zero" }
        );
    }
    println!(
        "server: {} of {} instances alive, {} requests queued",
        status.instances, status.max_instances, status.queued
    );
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[FunctionVersion]) {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:width$}  {:>7}  {:<19}  {:>9}  DEPLOYED",
        "NAME", "VERSION", "COMPONENT", "SIZE"
    );
    for r in rows {
        println!(
            "{:width$}  {:>7}  {:<19}  {:>9}  {}",
            r.name,
            r.version,
            short_digest(&r.component),
            human_bytes(r.component_size),
            r.created_at
        );
    }
}

fn short_digest(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / f64::from(1 << 10)),
        n => format!("{n} B"),
    }
}
