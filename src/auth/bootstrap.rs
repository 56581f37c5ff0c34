//! The first admin: `tmws agents create --namespace N --role admin` (prints a key once), or
//! `TMWS_BOOTSTRAP_ADMIN_KEY` (an admin created or updated at every start from a key the
//! operator generated and keeps in a secret store). There are no default credentials.

use super::{Role, config::BootstrapAdmin, keys};
use crate::{
    config::is_valid_identifier,
    store::{
        Db,
        identity::{Agent, NewAgent, NewApiKey},
    },
};

/// Creates or updates the bootstrap admin and its key.
pub async fn apply_bootstrap_admin(pg: &Db, b: &BootstrapAdmin) -> anyhow::Result<()> {
    let parsed = keys::parse(&b.key).ok_or_else(|| anyhow::anyhow!("TMWS_BOOTSTRAP_ADMIN_KEY is malformed"))?;
    pg.upsert_bootstrap_admin(&b.agent_id, &b.namespace, parsed.key_id, &keys::hash_secret(parsed.secret))
        .await
        .map_err(|e| anyhow::anyhow!("TMWS_BOOTSTRAP_ADMIN_KEY: {e}"))?;
    tracing::info!(agent = %b.agent_id, namespace = %b.namespace, key_id = %parsed.key_id, "bootstrap admin ready");
    Ok(())
}

/// `tmws agents create`: a new agent and its first key (the full key is returned once).
pub async fn create_agent(
    pg: &Db,
    id: Option<String>,
    namespace: &str,
    role: &str,
    display_name: Option<String>,
) -> anyhow::Result<(Agent, String)> {
    let role = Role::parse(role).ok_or_else(|| anyhow::anyhow!("--role must be admin, agent or readonly"))?;
    anyhow::ensure!(is_valid_identifier(namespace), "--namespace must be 1-128 characters of [A-Za-z0-9._:@-]");
    let id = id.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    anyhow::ensure!(is_valid_identifier(&id), "--id must be 1-128 characters of [A-Za-z0-9._:@-]");
    let agent = pg
        .create_agent(
            &NewAgent {
                id,
                namespace: namespace.to_string(),
                display_name: display_name.unwrap_or_default(),
                role,
                request_id: None,
            },
            None,
        )
        .await?;
    let key = issue_key(pg, &agent.id).await?;
    Ok((agent, key))
}

/// `tmws agents create-key`: a new key for an existing agent (e.g. a lost admin key).
pub async fn issue_key(pg: &Db, agent_id: &str) -> anyhow::Result<String> {
    let new = keys::generate()?;
    pg.create_api_key(
        &NewApiKey {
            id: new.key_id.clone(),
            agent_id: agent_id.to_string(),
            secret_hash: new.secret_hash.to_vec(),
            display_name: "created by tmws agents".into(),
            scopes: Vec::new(),
            expire_time: None,
            created_by: Some("cli".into()),
        },
        None,
    )
    .await?;
    Ok(new.full)
}
