# Runs PostgreSQL's own recovery TAP tests with walship as the WAL archive (issue 19): loaded with
# `prove -MWalshipArchive`, it changes how PostgreSQL::Test::Cluster archives and restores, never what a
# test asserts.
#
# - A node with archiving gets a walship receiver for its archive directory (one per directory) and a
#   walship sender that ships its pg_wal there. Its archive_command ships nothing: it waits until walship's
#   archive holds the file (pg_stat_archiver then says "walship has it"). Backup history files and
#   partials, which walship does not ship, are reported archived at once.
# - restore_command is `walship-receiver restore`.
# - A server in recovery whose configuration names a walship archive gets a sender once it is a primary
#   (promoted by the test, or at the end of a point-in-time recovery); the senders of the servers that
#   shipped into that archive before are stopped first, as a DBA fences the old primary at a failover
#   (one primary per archive, DESIGN.md).
#
# Environment: WALSHIP_BIN (the directory of walship-sender and walship-receiver), WALSHIP_CERTS (from
# `walship-receiver certs --out`).
package WalshipArchive;

use strict;
use warnings;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Time::HiRes qw(usleep);

my $bin   = $ENV{WALSHIP_BIN}   or die "WALSHIP_BIN is not set";
my $certs = $ENV{WALSHIP_CERTS} or die "WALSHIP_CERTS is not set";

my %receivers;    # archive dir => { port, pid }
my @children;     # the senders

sub spawn
{
	my ($log, @cmd) = @_;
	my $pid = fork();
	die "fork: $!" unless defined $pid;
	if ($pid == 0)
	{
		open(STDOUT, '>>', $log) or die "open $log: $!";
		open(STDERR, '>&', \*STDOUT) or die "dup: $!";
		exec(@cmd) or die "exec $cmd[0]: $!";
	}
	return $pid;
}

sub stop_pid
{
	my ($pid) = @_;
	kill 'TERM', $pid;
	for (1 .. 300)
	{
		return if waitpid($pid, 1) != 0;    # WNOHANG
		usleep(100_000);
	}
	kill 'KILL', $pid;
	waitpid($pid, 0);
}

sub receiver_for
{
	my ($archive, $logdir) = @_;
	return $receivers{$archive}{port} if $receivers{$archive};
	my $port = PostgreSQL::Test::Cluster::get_free_port();
	my $log  = "$logdir/walship-receiver.log";
	my $pid  = spawn(
		$log, "$bin/walship-receiver", 'run',
		'--listen',        "127.0.0.1:$port",
		'--archive',       $archive,
		'--tls-cert',      "$certs/server.crt",
		'--tls-key',       "$certs/server.key",
		'--tls-client-ca', "$certs/ca.crt");
	for (1 .. 300)
	{
		last if -f $log && slurp_file($log) =~ /listening on/;
		usleep(100_000);
	}
	slurp_file($log) =~ /listening on/
	  or die "walship-receiver for $archive did not start:\n" . slurp_file($log);
	$receivers{$archive} = { port => $port, pid => $pid };
	return $port;
}

# Senders register in a directory beside the archive (<archive>.senders/<pid>), so that the sender of a
# server promoted later can stop them first.
sub registry
{
	my ($archive) = @_;
	my $dir = "$archive.senders";
	mkdir $dir;
	return $dir;
}

# Whether $pid runs (a process that exited but is not reaped yet does not).
sub alive
{
	my ($pid) = @_;
	open(my $fh, '<', "/proc/$pid/stat") or return 0;
	my $stat = <$fh>;
	close($fh);
	return defined $stat && $stat !~ /^\d+ \(.*\) Z/;
}

# One primary per archive: the servers that shipped here before are fenced, as a DBA does at a failover.
sub fence_others
{
	my ($archive) = @_;
	my $dir = registry($archive);
	opendir(my $dh, $dir) or die "open $dir: $!";
	for my $pid (grep { /^\d+$/ } readdir($dh))
	{
		next if $pid == $$;
		if (alive($pid))
		{
			kill 'TERM', $pid;
			for (1 .. 300)
			{
				last if !alive($pid);
				usleep(100_000);
			}
		}
		unlink "$dir/$pid";
	}
	closedir($dh);
}

sub sender_command
{
	my ($node, $archive) = @_;
	my $port = receiver_for($archive, $node->basedir);
	my $conn = 'host=' . $node->host . ' port=' . $node->port . ' dbname=postgres';
	return (
		"$bin/walship-sender", 'run',
		'--pgconn',          $conn,
		'--receiver',        "127.0.0.1:$port",
		'--tls-server-name', 'localhost',
		'--tls-ca',          "$certs/ca.crt",
		'--tls-cert',        "$certs/client.crt",
		'--tls-key',         "$certs/client.key");
}

# Starts the node's sender (fencing the others of its archive) and waits until it streams, so that what
# the test does next (a WAL switch, a shutdown) finds walship shipping.
my $started = 0;

sub start_sender
{
	my ($node, $archive) = @_;
	my @cmd = sender_command($node, $archive);
	fence_others($archive);
	$started++;
	my $log = $node->basedir . "/walship-sender-$started.log";
	my $pid = spawn($log, @cmd);
	push @children, $pid;
	if (open(my $fh, '>', registry($archive) . "/$pid")) { close($fh); }
	for (1 .. 600)
	{
		return if -f $log && slurp_file($log) =~ /streaming/;
		die "walship-sender of node " . $node->name . " exited:\n" . slurp_file($log)
		  if waitpid($pid, 1) > 0;
		usleep(100_000);
	}
	die "walship-sender of node " . $node->name . " is not streaming after 60 s:\n" . slurp_file($log);
}

# Servers in recovery whose configuration names a walship archive: they get a sender once they are
# primaries (promoted by the test, or at the end of a point-in-time recovery).
my %pending;    # node name => node

sub activate_if_promoted
{
	my ($node) = @_;
	return unless $pending{ $node->name };
	my $state = $node->safe_psql('postgres', 'SELECT pg_is_in_recovery()');
	return unless $state eq 'f';
	delete $pending{ $node->name };
	start_sender($node, archive_of($node));
}

# The walship archive a node's configuration names, if any.
sub archive_of
{
	my ($node) = @_;
	my $conf = slurp_file($node->data_dir . '/postgresql.conf');
	my @dirs = $conf =~ /walship-archived" "([^"]+)"/g;
	return $dirs[-1];
}

sub in_recovery
{
	my ($node) = @_;
	return -f $node->data_dir . '/standby.signal'
	  || -f $node->data_dir . '/recovery.signal';
}

no warnings 'redefine';

my $wait_script;

sub wait_script
{
	return $wait_script if $wait_script;
	$wait_script = PostgreSQL::Test::Utils::tempdir() . '/walship-archived';
	open(my $fh, '>', $wait_script) or die "create $wait_script: $!";
	print $fh <<'SH';
#!/bin/sh
# archive_command: walship ships the WAL itself; succeed once its archive ($1) holds the file $2
case "$2" in *.backup|*.partial) exit 0 ;; esac
i=0
while [ $i -lt 600 ]; do
	[ -f "$1/$2" ] && exit 0
	sleep 0.1
	i=$((i + 1))
done
echo "walship's archive $1 does not hold $2 after 60 s" >&2
exit 1
SH
	close($fh);
	chmod 0755, $wait_script;
	return $wait_script;
}

*PostgreSQL::Test::Cluster::enable_archiving = sub {
	my ($self) = @_;
	my $path   = $self->archive_dir;
	my $script = wait_script();
	print "### Enabling walship archiving for node \"" . $self->name . "\"\n";
	$self->append_conf(
		'postgresql.conf', qq(
archive_mode = on
archive_command = '"$script" "$path" "%f"'
));
	return;
};

*PostgreSQL::Test::Cluster::enable_restoring = sub {
	my ($self, $root_node, $standby) = @_;
	my $path = $root_node->archive_dir;
	print "### Enabling walship restore for node \"" . $self->name . "\"\n";
	$self->append_conf('postgresql.conf', qq(
restore_command = '"$bin/walship-receiver" restore --archive "$path" %f %p'
));
	$standby ? $self->set_standby_mode() : $self->set_recovery_mode();
	return;
};

my $orig_start = \&PostgreSQL::Test::Cluster::start;
*PostgreSQL::Test::Cluster::start = sub {
	my ($self, @rest) = @_;
	my $ret = $orig_start->($self, @rest);
	my $archive = archive_of($self);
	if ($ret && $archive)
	{
		if (in_recovery($self)) { $pending{ $self->name } = $self; }
		else { start_sender($self, $archive); }
	}
	return $ret;
};

my $orig_promote = \&PostgreSQL::Test::Cluster::promote;
*PostgreSQL::Test::Cluster::promote = sub {
	my ($self, @rest) = @_;
	my $ret = $orig_promote->($self, @rest);
	# pg_ctl promote waits until the server is a primary
	activate_if_promoted($self);
	return $ret;
};

my $orig_poll = \&PostgreSQL::Test::Cluster::poll_query_until;
*PostgreSQL::Test::Cluster::poll_query_until = sub {
	my ($self, @rest) = @_;
	my $ret = $orig_poll->($self, @rest);
	# a point-in-time recovery that promotes itself: the test waits for it with a query
	activate_if_promoted($self) if $ret;
	return $ret;
};

END
{
	my $status = $?;
	stop_pid($_) for @children;
	stop_pid($_->{pid}) for values %receivers;
	$? = $status;
}

1;
