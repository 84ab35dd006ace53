//! JetStream mode: the stream looked up or created (once per burst of resends), bounded
//! publishes, and the ack wait that resends the same message (same `Nats-Msg-Id`) until the
//! stream acknowledges it.

use super::*;

impl Inner {
    /// Looks the stream up, creating it when missing and allowed; returns its subjects, or
    /// `None` when a lookup ran less than `unless_within` ago (after a server restart
    /// thousands of resends ask at once; one lookup answers them all).
    pub(super) async fn ensure_stream(
        &self,
        js: &jetstream::Context,
        unless_within: Option<Duration>,
    ) -> Result<Option<Vec<String>>, SinkError> {
        let mut checked = self.stream_checked.lock().await;
        if let (Some(at), Some(within)) = (*checked, unless_within) {
            if at.elapsed() < within {
                return Ok(None);
            }
        }
        let result = self.lookup_or_create_stream(js).await;
        *checked = Some(Instant::now());
        result.map(Some)
    }

    pub(super) async fn lookup_or_create_stream(
        &self,
        js: &jetstream::Context,
    ) -> Result<Vec<String>, SinkError> {
        match js.get_stream(&self.stream).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| retryable(format!("stream {}: {e}", self.stream)))?;
                Ok(info.config.subjects.clone())
            }
            Err(e) => {
                let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(api) if api.error_code() == ErrorCode::STREAM_NOT_FOUND);
                if !missing {
                    return Err(retryable(format!("stream {}: {e}", self.stream)));
                }
                if !self.create_stream {
                    return Err(fatal(format!(
                        "stream {} does not exist and create_stream is off",
                        self.stream
                    )));
                }
                let subjects = self.subjects.stream_subjects();
                let config = jetstream::stream::Config {
                    name: self.stream.clone(),
                    subjects: subjects.clone(),
                    storage: jetstream::stream::StorageType::File,
                    duplicate_window: DUPLICATE_WINDOW,
                    ..Default::default()
                };
                js.create_stream(config).await.map_err(|e| {
                    let message = format!("create stream {}: {e}", self.stream);
                    match e.kind() {
                        jetstream::context::CreateStreamErrorKind::JetStream(_)
                        | jetstream::context::CreateStreamErrorKind::InvalidStreamName
                        | jetstream::context::CreateStreamErrorKind::EmptyStreamName => {
                            fatal(message)
                        }
                        _ => retryable(message),
                    }
                })?;
                tracing::info!(sink = NAME, stream = %self.stream, subjects = ?subjects, "created stream");
                Ok(subjects)
            }
        }
    }

    /// Waits for a JetStream ack, resending the same message (same `Nats-Msg-Id`) after
    /// retryable failures until the stream acknowledges it, it is refused, or the sink is
    /// dropped.
    ///
    /// This runs as one task per message; the resends live in a boxed future of their own,
    /// so the task's future (copied into every task spawned) is only the wait for the ack.
    pub(super) async fn confirm(
        self: Arc<Self>,
        publish: Outgoing,
        ack: PublishAckFuture,
    ) -> Result<(), SinkError> {
        let result = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(SinkError::Cancelled { sink: NAME.into() }),
            result = ack => result,
        };
        match result {
            Ok(_) => Ok(()),
            Err(error) => Box::pin(self.resend(publish, error)).await,
        }
    }

    /// [`Inner::confirm`] after the first ack failed with `error`.
    async fn resend(
        self: Arc<Self>,
        publish: Outgoing,
        mut error: async_nats::jetstream::context::PublishError,
    ) -> Result<(), SinkError> {
        let conn = self.conn().await?;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        loop {
            let is_missing_stream = error.kind() == PublishErrorKind::StreamNotFound;
            let mut failure = publish_error(&error);
            let ack = loop {
                if !failure.is_retryable() {
                    return Err(failure);
                }
                metrics::inc(&metrics::metrics().sink_retries_total);
                self.warn_throttled("JetStream publish not acknowledged", &failure);
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(SinkError::Cancelled { sink: NAME.into() }),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
                if is_missing_stream && self.create_stream {
                    // A server that lost its store comes back without the stream; a failure
                    // here shows again as a failed resend.
                    let _ = self.ensure_stream(&conn.js, Some(STREAM_RECHECK)).await;
                }
                let resent = match headers_of(&publish.msg, publish.format) {
                    Ok(headers) => self.send_js(conn, &publish, headers).await,
                    Err(e) => return Err(e),
                };
                match resent {
                    Ok(next) => break next,
                    Err(e) => failure = e,
                }
            };
            let result = tokio::select! {
                _ = self.shutdown.cancelled() => return Err(SinkError::Cancelled { sink: NAME.into() }),
                result = ack => result,
            };
            match result {
                Ok(_) => return Ok(()),
                Err(e) => error = e,
            }
        }
    }

    /// One JetStream publish, bounded: the client may be reconnecting, and a full command
    /// channel or exhausted ack permits would otherwise wait for as long as the outage lasts.
    pub(super) async fn send_js(
        &self,
        conn: &Conn,
        publish: &Outgoing,
        headers: HeaderMap,
    ) -> Result<PublishAckFuture, SinkError> {
        let message = PublishMessage::build()
            .payload(publish.payload.clone())
            .headers(headers);
        match tokio::time::timeout(
            self.ack_timeout,
            conn.js.send_publish(publish.subject.clone(), message),
        )
        .await
        {
            Ok(Ok(ack)) => Ok(ack),
            Ok(Err(e)) => Err(publish_error(&e)),
            Err(_) => Err(retryable("publish timed out (server unreachable?)")),
        }
    }
}
