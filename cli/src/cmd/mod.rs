//! One module per subcommand (as Litestream's `cmd/litestream/<command>.go`): each loads the
//! config, opens what it needs through [`crate::open`], calls the library crates and prints for
//! people (or JSON), adding context to errors. [`mongo`] holds the `--source mongo` side of
//! backup, restore, list, verify and drill. Nothing outside `cmd` depends on these modules.

pub mod backup;
pub mod check;
pub mod copy;
pub mod drill;
pub mod dump;
pub mod expire;
pub mod files;
pub mod find;
pub mod init;
pub mod keys;
pub mod list;
pub mod mark;
pub mod mongo;
pub mod pin;
pub mod restore;
pub mod status;
pub mod stream;
pub mod table;
pub mod verify;
pub mod verify_journal;
pub mod wal_fetch;
