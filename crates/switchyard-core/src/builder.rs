//! The builder every engine's backend configuration has, written once.

/// Defines `$builder`, a builder over the engine configuration `$config`
/// (which has `new(endpoint, url)`, `pool` and `tls`), with `pool`, `tls`,
/// one setter per `name(arg: Type) => field = value;` line, `config` and
/// `build` (through `$backend::new`), and `$config::builder`. An engine adds
/// setters of another shape in an `impl` of its own.
#[doc(hidden)]
#[macro_export]
macro_rules! backend_builder {
    (
        $(#[$doc:meta])*
        $builder:ident for $config:ident => $backend:ident;
        $($setter:ident($arg:ident: $ty:ty) => $field:ident = $value:expr;)*
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone)]
        pub struct $builder {
            config: $config,
        }

        impl $config {
            /// Starts a builder for `url`.
            pub fn builder(
                endpoint: impl Into<std::sync::Arc<str>>,
                url: impl Into<$crate::SecretUrl>,
            ) -> $builder {
                $builder {
                    config: Self::new(endpoint, url),
                }
            }
        }

        impl $builder {
            /// Sets the pool settings (for an engine without sessions to
            /// pool, `max_size` bounds the requests in flight).
            pub fn pool(mut self, pool: $crate::PoolSettings) -> Self {
                self.config.pool = pool;
                self
            }

            #[doc = concat!("Sets the TLS settings (see [`", stringify!($config), "::tls`]).")]
            pub fn tls(mut self, tls: $crate::TlsSettings) -> Self {
                self.config.tls = Some(tls);
                self
            }

            $(
                #[doc = concat!("Sets [`", stringify!($config), "::", stringify!($field), "`].")]
                pub fn $setter(mut self, $arg: $ty) -> Self {
                    self.config.$field = $value;
                    self
                }
            )*

            /// The configuration built so far.
            pub fn config(self) -> $config {
                self.config
            }

            #[doc = concat!("Builds the backend; see [`", stringify!($backend), "::new`].")]
            pub fn build(self) -> Result<$backend, $crate::Error> {
                $backend::new(self.config)
            }
        }
    };
}
